//! Logs are JSON lines naming the request id, the caller and the flow, with one line per
//! finished request.

mod common;

use common::*;
use giroident_broker::config::LogFormat;
use serde_json::{Value, json};

#[tokio::test]
async fn each_request_ends_in_one_json_line_with_its_request_id() {
    let logs = CapturedLogs::install(LogFormat::Json, "info");
    let env = TestEnv::start().await;
    let response = env
        .http
        .post(format!("{}/kyc-sessions", env.broker_url))
        .header("x-request-id", "log-test-4711")
        .json(&json!({"flow": "access"}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 201);
    env.stop().await;

    let text = logs.text();
    let lines: Vec<Value> = text
        .lines()
        .map(|line| serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}")))
        .collect();
    let finished: Vec<&Value> = lines
        .iter()
        .filter(|l| {
            l["message"] == "request finished" && l["span"]["request_id"] == "log-test-4711"
        })
        .collect();
    assert_eq!(finished.len(), 1, "{text}");
    let line = finished[0];
    assert_eq!(line["status"], 201);
    assert!(line["latency_ms"].as_f64().unwrap() > 0.0);
    assert_eq!(line["span"]["caller"], "demo");
    assert_eq!(line["span"]["flow"], "access");
    assert_eq!(line["level"], "INFO");
}
