//! The in-flight gauge gives its place back when a client goes away mid-request. Alone in its
//! test binary: the metrics recorder is per process, and other tests' requests would count.

mod common;

use std::time::Duration;

use common::*;
use giroident_broker::sim::FaultRule;
use serde_json::json;

fn in_flight(metrics: &str) -> Option<f64> {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix("broker_http_requests_in_flight "))
        .and_then(|v| v.trim().parse().ok())
}

#[tokio::test]
async fn a_request_abandoned_by_its_client_leaves_the_in_flight_gauge() {
    let env = TestEnv::start().await;
    env.sim.add_fault(FaultRule {
        endpoint: CREATE_USER.into(),
        latency_ms: Some(2_000),
        count: Some(1),
        ..FaultRule::default()
    });
    // The client gives up while the broker waits for finAPI; hyper drops the request.
    let abandoned = tokio::time::timeout(
        Duration::from_millis(300),
        env.start_session(json!({"flow": "access"})),
    )
    .await;
    assert!(abandoned.is_err(), "the request was still waiting");
    let mut last = None;
    for _ in 0..50 {
        last = in_flight(&env.metrics_text().await);
        if last == Some(0.0) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(last, Some(0.0), "no request is in flight any more");
    env.stop().await;
}
