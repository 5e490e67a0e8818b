//! finAPI calls go through the egress proxy the environment names (reqwest reads `HTTP_PROXY`
//! and friends at start-up; the broker only skips that lookup when none is set).

mod common;

use std::net::TcpListener;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use common::{CREATE_PROCESS, CREATE_USER};
use giroident_broker::sim::{self, DEMO_CLIENT_ID, DEMO_CLIENT_SECRET, SimConfig};
use serde_json::json;

struct Broker(Child);

impl Drop for Broker {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test]
async fn upstream_calls_go_through_the_proxy_the_environment_names() {
    // The simulator plays the proxy: hyper accepts requests in absolute form and the simulator
    // routes by path. finAPI's own address is one no resolver knows, so a session can only
    // succeed through the proxy (and no lookup is made: a proxied request is not resolved here).
    let sim = sim::start(SimConfig::default())
        .await
        .expect("simulator starts");
    let listen = TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port");
    let unreachable = "http://finapi.invalid";
    let child = common::broker_command(&common::sqlite_ledger())
        .envs([
            ("GIROIDENT_BROKER_SERVER__LISTEN", listen.to_string()),
            ("GIROIDENT_BROKER_ADMIN__LISTEN", "127.0.0.1:0".into()),
            ("GIROIDENT_BROKER_AUTH__DISABLED", "true".into()),
            ("GIROIDENT_BROKER_FINAPI__ACCESS_URL", unreachable.into()),
            (
                "GIROIDENT_BROKER_FINAPI__PROCESS_CONTROLLER_URL",
                unreachable.into(),
            ),
            (
                "GIROIDENT_BROKER_FINAPI__ALLOW_INSECURE_HTTP",
                "true".into(),
            ),
            ("GIROIDENT_BROKER_FINAPI__CLIENT_ID", DEMO_CLIENT_ID.into()),
            (
                "GIROIDENT_BROKER_FINAPI__CLIENT_SECRET",
                DEMO_CLIENT_SECRET.into(),
            ),
            ("GIROIDENT_BROKER_LOG__FILTER", "warn".into()),
            ("HTTP_PROXY", sim.base_url()),
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("the broker starts");
    let _broker = Broker(child);
    let base = format!("http://{listen}");
    // Authentication is off for this broker; the key is not looked at.
    let http = common::client_with_key("unused");
    let started = Instant::now();
    while http
        .get(format!("{base}/readyz"))
        .send()
        .await
        .map_or(true, |r| r.status() != 200)
    {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "the broker never became ready"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    for (body, endpoint, status) in [
        (json!({"flow": "access"}), CREATE_USER, "201"),
        (
            json!({"flow": "standalone", "clientReference": "via-proxy"}),
            CREATE_PROCESS,
            "201",
        ),
    ] {
        let response = http
            .post(format!("{base}/kyc-sessions"))
            .json(&body)
            .send()
            .await
            .expect("an answer");
        assert_eq!(
            response.status(),
            201,
            "{body}: {:?}",
            response.text().await
        );
        let seen = sim
            .stats()
            .get(endpoint)
            .and_then(|by_status| by_status.get(status))
            .copied();
        assert_eq!(seen, Some(1), "{endpoint} went through the proxy");
    }
}
