//! What an upstream answer may contain, and what happens while it is read (issue: hardening,
//! items 3 and 4): tokens outside finAPI's contract, tokens that cannot be a header, bodies
//! that stall or break off. Each runs against the real broker and the real simulator, whose body
//! faults produce the answers.

mod common;

use common::{CLIENT_TOKEN, CREATE_PROCESS, CREATE_USER, EXCHANGE, PASSWORD_TOKEN, TestEnv};
use giroident_broker::config::Settings;
use giroident_broker::sim::{FaultRule, SimConfig};
use serde_json::{Value, json};

/// One call of `endpoint` answers with these fields written over its real answer.
fn set_once(endpoint: &str, fields: Value) -> FaultRule {
    FaultRule {
        endpoint: endpoint.to_owned(),
        set: fields.as_object().cloned(),
        count: Some(1),
        ..FaultRule::default()
    }
}

fn quick(s: &mut Settings) {
    s.finapi.request_timeout_ms = 1_000;
    s.resilience.base_backoff_ms = 10;
    s.resilience.max_backoff_ms = 50;
    s.resilience.session_budget_ms = 8_000;
}

async fn env() -> TestEnv {
    TestEnv::with(SimConfig::default(), quick).await
}

/// The value of the Prometheus sample whose line starts with `prefix`.
fn sample(metrics: &str, prefix: &str, labels: &[&str]) -> f64 {
    metrics
        .lines()
        .filter(|line| line.starts_with(prefix) && labels.iter().all(|l| line.contains(l)))
        .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[tokio::test]
async fn an_exchange_answering_an_empty_or_blank_token_is_a_502() {
    let env = env().await;
    for token in ["", "  ", "a b", "tab\there"] {
        env.sim
            .add_fault(set_once(EXCHANGE, json!({ "accessToken": token })));
        let response = env
            .start_session(json!({"flow": "standalone", "clientReference": "c-1"}))
            .await;
        common::expect_problem(response, 502, "UPSTREAM_ERROR").await;
    }
    env.stop().await;
}

#[tokio::test]
async fn a_password_grant_answering_an_empty_or_oversized_token_is_a_502() {
    let env = env().await;
    for token in [String::new(), "x".repeat(8193)] {
        env.sim
            .add_fault(set_once(PASSWORD_TOKEN, json!({ "access_token": token })));
        let response = env.start_session(json!({"flow": "access"})).await;
        common::expect_problem(response, 502, "UPSTREAM_ERROR").await;
    }
    // finAPI's longest token is fine.
    env.sim.add_fault(set_once(
        PASSWORD_TOKEN,
        json!({ "access_token": "y".repeat(8192) }),
    ));
    let session = common::expect_created(env.start_session(json!({"flow": "access"})).await).await;
    assert_eq!(session["accessToken"].as_str().map(str::len), Some(8192));
    env.stop().await;
}

#[tokio::test]
async fn a_client_token_that_cannot_be_a_header_is_refused_not_cached() {
    let env = env().await;
    env.sim.add_fault(set_once(
        CLIENT_TOKEN,
        json!({ "access_token": "line\nbreak" }),
    ));
    let response = env.start_session(json!({"flow": "access"})).await;
    common::expect_problem(response, 502, "UPSTREAM_ERROR").await;
    // Refused where it was decoded: no user call was even attempted.
    assert_eq!(env.all_calls(CREATE_USER), 0);
    // Not cached: the next request fetches again and succeeds.
    common::expect_created(env.start_session(json!({"flow": "access"})).await).await;
    assert_eq!(env.all_calls(CLIENT_TOKEN), 2);
    // Not retried, and no breaker failure (the metrics recorder is shared by this binary's
    // tests, so the broker's own counters speak here).
    assert_eq!(env.resilience().retries, 0);
    assert!(env.flows.circuits_open().iter().all(|(_, _, open)| !open));
    env.stop().await;
}

#[tokio::test]
async fn an_oversized_error_body_stops_being_read_and_answers_502() {
    let env = env().await;
    env.sim.add_fault(FaultRule {
        endpoint: CLIENT_TOKEN.to_owned(),
        status: Some(500),
        pad_bytes: Some(64 * 1024 * 1024),
        ..FaultRule::default()
    });
    let response = env.start_session(json!({"flow": "access"})).await;
    common::expect_problem(response, 502, "UPSTREAM_ERROR").await;
    let metrics = env.metrics_text().await;
    assert!(
        sample(
            &metrics,
            "broker_finapi_calls_total",
            &["client_token", "body_too_large"]
        ) >= 1.0,
        "{metrics}"
    );
    env.stop().await;
}

#[tokio::test]
async fn a_token_body_stalling_past_the_call_timeout_is_a_timeout_and_retried() {
    let env = env().await;
    env.sim.add_fault(FaultRule {
        endpoint: PASSWORD_TOKEN.to_owned(),
        stall_after_bytes: Some(5),
        stall_ms: Some(3_000),
        count: Some(1),
        ..FaultRule::default()
    });
    common::expect_created(env.start_session(json!({"flow": "access"})).await).await;
    assert_eq!(env.all_calls(PASSWORD_TOKEN), 2);
    let metrics = env.metrics_text().await;
    assert_eq!(
        sample(
            &metrics,
            "broker_finapi_calls_total",
            &["user_token", "outcome=\"timeout\""]
        ),
        1.0,
        "{metrics}"
    );
    env.stop().await;
}

#[tokio::test]
async fn a_body_stalling_on_every_attempt_ends_in_504() {
    let env = env().await;
    env.sim.add_fault(FaultRule {
        endpoint: CREATE_PROCESS.to_owned(),
        stall_after_bytes: Some(5),
        stall_ms: Some(3_000),
        ..FaultRule::default()
    });
    let response = env
        .start_session(json!({"flow": "standalone", "clientReference": "c-1"}))
        .await;
    common::expect_problem(response, 504, "UPSTREAM_TIMEOUT").await;
    env.stop().await;
}

#[tokio::test]
async fn an_exchange_answer_cut_off_starts_one_new_process() {
    let env = env().await;
    env.sim.add_fault(FaultRule {
        endpoint: EXCHANGE.to_owned(),
        cut_after_bytes: Some(5),
        count: Some(1),
        ..FaultRule::default()
    });
    let session = env.standalone_session("c-1").await;
    assert!(session["accessToken"].is_string());
    assert_eq!(env.all_calls(CREATE_PROCESS), 2);
    assert_eq!(env.resilience().process_restarts, 1);
    let metrics = env.metrics_text().await;
    assert_eq!(
        sample(
            &metrics,
            "broker_finapi_calls_total",
            &["exchange_process_token", "transport_error"]
        ),
        1.0,
        "{metrics}"
    );
    env.stop().await;
}

#[tokio::test]
async fn a_cut_off_client_token_answer_is_retried() {
    let env = env().await;
    env.sim.add_fault(FaultRule {
        endpoint: CLIENT_TOKEN.to_owned(),
        cut_after_bytes: Some(5),
        count: Some(1),
        ..FaultRule::default()
    });
    common::expect_created(env.start_session(json!({"flow": "access"})).await).await;
    assert_eq!(env.all_calls(CLIENT_TOKEN), 2);
    env.stop().await;
}

#[tokio::test]
async fn a_token_answer_missing_a_required_field_or_not_bearer_is_a_502() {
    let env = env().await;
    for fields in [
        json!({ "token_type": "x<script>" }),
        json!({ "token_type": null }),
        json!({ "expires_in": null }),
        json!({ "expires_in": -1 }),
    ] {
        env.sim.add_fault(set_once(PASSWORD_TOKEN, fields));
        let response = env.start_session(json!({"flow": "access"})).await;
        common::expect_problem(response, 502, "UPSTREAM_ERROR").await;
    }
    // finAPI's own spelling varies in case; the caller always reads `bearer`.
    env.sim
        .add_fault(set_once(PASSWORD_TOKEN, json!({ "token_type": "Bearer" })));
    let session = common::expect_created(env.start_session(json!({"flow": "access"})).await).await;
    assert_eq!(session["tokenType"], "bearer");
    env.stop().await;
}
