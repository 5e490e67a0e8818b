//! Logs are JSON lines naming the request id, the caller and the flow, with one line per
//! finished request, also for one its client abandoned. One test per binary: a process has one global subscriber.

mod common;

use common::*;
use giroident_broker::config::LogFormat;
use serde_json::{Value, json};

#[tokio::test]
async fn a_successful_session_at_info_is_one_line_with_everything_an_operator_needs() {
    let logs = CapturedLogs::install(LogFormat::Json, "info");
    // The level filter's maximum is the global one: `debug!` and dependencies' `log` records
    // are skipped where they are written.
    assert_eq!(
        tracing::level_filters::LevelFilter::current(),
        tracing::level_filters::LevelFilter::INFO
    );
    let env = TestEnv::start().await;
    let response = env
        .http
        .post(format!("{}/kyc-sessions", env.broker_url))
        .header("x-request-id", "log-test-one-line")
        .json(&json!({"flow": "access", "clientReference": "customer-one-line"}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 201);
    let session: Value = response.json().await.unwrap();

    // A client that gives up while the broker waits for finAPI: hyper drops the request, which
    // still ends in its line.
    env.sim.add_fault(giroident_broker::sim::FaultRule {
        endpoint: CREATE_USER.into(),
        latency_ms: Some(2_000),
        count: Some(1),
        ..Default::default()
    });
    let abandoned = tokio::time::timeout(
        std::time::Duration::from_millis(300),
        env.http
            .post(format!("{}/kyc-sessions", env.broker_url))
            .header("x-request-id", "log-test-abandoned")
            .json(&json!({"flow": "access"}))
            .send(),
    )
    .await;
    assert!(abandoned.is_err(), "the request was still waiting");
    let finished = |logs: &CapturedLogs| {
        logs.text()
            .lines()
            .filter(|l| l.contains("log-test-abandoned") && l.contains("request finished"))
            .count()
    };
    assert!(
        eventually(std::time::Duration::from_secs(5), || finished(&logs) > 0).await,
        "an abandoned request wrote no request finished line: {}",
        logs.text()
    );
    env.stop().await;
    assert_eq!(finished(&logs), 1);
    let abandoned: Value = logs
        .text()
        .lines()
        .find(|l| l.contains("log-test-abandoned") && l.contains("request finished"))
        .map(|l| serde_json::from_str(l).unwrap())
        .unwrap();
    assert_eq!(abandoned["status"], 499);
    assert!(abandoned["latency_ms"].as_f64().unwrap() >= 300.0);

    let text = logs.text();
    let lines: Vec<Value> = text
        .lines()
        .map(|line| serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}")))
        .filter(|l: &Value| l["span"]["request_id"] == "log-test-one-line")
        .collect();
    assert_eq!(lines.len(), 1, "{text}");
    let line = &lines[0];
    assert_eq!(line["message"], "request finished");
    assert_eq!(line["level"], "INFO");
    assert_eq!(line["status"], 201);
    assert!(line["latency_ms"].as_f64().unwrap() > 0.0);
    assert!(line["timestamp"].is_string());
    assert_eq!(line["caller"], "demo");
    assert_eq!(line["flow"], "access");
    assert_eq!(line["finapi_client"], "default");
    assert_eq!(line["user_id"], session["userId"]);
    let span = &line["span"];
    assert_eq!(span["request_id"], "log-test-one-line");
    assert_eq!(span["method"], "POST");
    assert_eq!(span["path"], "/kyc-sessions");
    assert!(
        !text.contains("customer-one-line"),
        "a raw client reference was logged: {text}"
    );
}
