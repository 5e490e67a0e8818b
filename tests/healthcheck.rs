//! The `healthcheck` subcommand's check against a real broker and against ports that do not
//! answer.

mod common;

use std::time::{Duration, Instant};

use common::TestEnv;
use giroident_broker::healthcheck::{self, HealthcheckError};
use reqwest::Url;

fn url(base: &str, path: &str) -> Url {
    Url::parse(&format!("{base}{path}")).unwrap()
}

#[tokio::test]
async fn a_running_broker_is_healthy() {
    let env = TestEnv::start().await;
    for path in ["/livez", "/readyz"] {
        let status = healthcheck::check(url(&env.broker_url, path), healthcheck::TIMEOUT)
            .await
            .expect("healthy");
        assert_eq!(status, 200, "{path}");
    }
    env.stop().await;
}

#[tokio::test]
async fn an_answer_other_than_2xx_is_unhealthy() {
    let env = TestEnv::start().await;
    let err = healthcheck::check(url(&env.broker_url, "/no-such-path"), healthcheck::TIMEOUT)
        .await
        .unwrap_err();
    assert!(
        matches!(err, HealthcheckError::Unhealthy { status, .. } if status == 404),
        "{err:?}"
    );
    env.stop().await;
}

#[tokio::test]
async fn a_closed_port_is_unhealthy() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    drop(listener);
    let err = healthcheck::check(
        url(&format!("http://{addr}"), "/livez"),
        healthcheck::TIMEOUT,
    )
    .await
    .unwrap_err();
    assert!(matches!(err, HealthcheckError::NoAnswer { .. }), "{err:?}");
}

#[tokio::test]
async fn a_server_that_never_answers_is_unhealthy_within_the_timeout() {
    // Accepts connections (the kernel does, from the backlog) but never reads or answers.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let timeout = Duration::from_millis(300);
    let started = Instant::now();
    let err = healthcheck::check(url(&format!("http://{addr}"), "/livez"), timeout)
        .await
        .unwrap_err();
    assert!(matches!(err, HealthcheckError::NoAnswer { .. }), "{err:?}");
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    drop(listener);
}

/// A URL's password (basic auth at a proxy in front of the broker, say) was printed with
/// every unhealthy result: the messages name the URL without it.
#[tokio::test]
async fn an_unhealthy_result_never_shows_the_urls_password() {
    let env = TestEnv::start().await;
    let with_password = |base: &str, path: &str| {
        let mut url = url(base, path);
        url.set_username("probe").unwrap();
        url.set_password(Some("hc-secret-pw")).unwrap();
        url
    };
    let unhealthy = healthcheck::check(
        with_password(&env.broker_url, "/no-such-path"),
        healthcheck::TIMEOUT,
    )
    .await
    .unwrap_err();
    env.stop().await;
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let closed = format!("http://{}", listener.local_addr().unwrap());
    drop(listener);
    let no_answer = healthcheck::check(with_password(&closed, "/livez"), healthcheck::TIMEOUT)
        .await
        .unwrap_err();
    for err in [unhealthy, no_answer] {
        let shown = format!("{} {err:?}", giroident_broker::telemetry::cause_chain(&err));
        assert!(!shown.contains("hc-secret-pw"), "{shown}");
        assert!(
            shown.contains("no-such-path") || shown.contains("livez"),
            "{shown}"
        );
    }
}
