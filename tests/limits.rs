//! Rate limits, load shedding, read timeouts and disabled authentication, observed on a real
//! broker.

mod common;

use std::time::Duration;

use common::*;
use giroident_broker::config::{CallerSettings, FlowKind};
use giroident_broker::sim::{FaultRule, SimConfig};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[tokio::test]
async fn a_caller_over_its_rate_gets_429_with_retry_after_and_others_do_not() {
    let env = TestEnv::with(SimConfig::default(), |s| {
        s.limits.caller_rate_per_sec = 1;
        s.limits.caller_burst = 3;
        s.auth.callers.push(CallerSettings::from_key(
            "second",
            b"second-caller-key",
            &[FlowKind::Access],
        ));
    })
    .await;
    for _ in 0..3 {
        env.access_session().await;
    }
    let response = env.start_session(json!({"flow": "access"})).await;
    let retry_after: u64 = response.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=2).contains(&retry_after), "Retry-After: {retry_after}");
    expect_problem(response, 429, "RATE_LIMITED").await;
    // The limit is per caller.
    let second = client_with_key("second-caller-key")
        .post(format!("{}/kyc-sessions", env.broker_url))
        .json(&json!({"flow": "access"}))
        .send()
        .await
        .unwrap();
    expect_created(second).await;
    // Refused requests cost finAPI nothing.
    assert_eq!(env.all_calls(CREATE_USER), 4);
    // The refusal counts for the caller it refused.
    let metrics = env.metrics_text().await;
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("broker_http_requests_total")
                && l.contains("status=\"429\"")
                && l.contains("caller=\"demo\"")),
        "{metrics}"
    );
    env.stop().await;
}

#[tokio::test]
async fn requests_beyond_the_in_flight_limit_are_shed_at_once() {
    let env = TestEnv::with(SimConfig::default(), |s| s.limits.max_in_flight = 2).await;
    env.sim.add_fault(FaultRule {
        endpoint: CREATE_PROCESS.into(),
        latency_ms: Some(1500),
        count: Some(2),
        ..FaultRule::default()
    });
    let (done, mut finished) = tokio::sync::mpsc::unbounded_channel();
    let request = |reference: &str| {
        env.http
            .post(format!("{}/kyc-sessions", env.broker_url))
            .header("x-request-id", reference)
            .json(&json!({"flow": "standalone", "clientReference": reference}))
    };
    // Two slow requests take both permits; the simulator holds them...
    for i in 0..2 {
        let (req, done) = (request(&format!("slow-{i}")), done.clone());
        tokio::spawn(async move { done.send(req.send().await.unwrap()).unwrap() });
    }
    let seen = |id: &str| env.sim.state().seen_request_ids().iter().any(|s| s == id);
    assert!(eventually(Duration::from_secs(5), || seen("slow-0") && seen("slow-1")).await);
    // ...while four more are refused.
    for i in 0..4 {
        let (req, done) = (request(&format!("shed-{i}")), done.clone());
        tokio::spawn(async move { done.send(req.send().await.unwrap()).unwrap() });
    }
    drop(done);
    let mut order = Vec::new();
    while let Some(response) = finished.recv().await {
        order.push(response.status().as_u16());
        if response.status() == 503 {
            expect_problem(response, 503, "OVERLOADED").await;
        }
    }
    assert_eq!(order, [503, 503, 503, 503, 201, 201]);
    env.stop().await;
}

#[tokio::test]
async fn a_body_that_does_not_arrive_in_time_gets_408() {
    let env = TestEnv::with(SimConfig::default(), |s| s.limits.read_timeout_secs = 1).await;
    let addr = env.broker_url.trim_start_matches("http://");
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let head = format!(
        "POST /kyc-sessions HTTP/1.1\r\nHost: {addr}\r\nX-Api-Key: {TEST_API_KEY}\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{{\"flow\":"
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    let mut answer = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut answer));
    read.await.expect("the broker answers").unwrap();
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains("BODY_TIMEOUT"), "{answer}");
    env.stop().await;
}

#[tokio::test]
async fn headers_that_do_not_arrive_in_time_close_the_connection() {
    let env = TestEnv::with(SimConfig::default(), |s| s.limits.read_timeout_secs = 1).await;
    let addr = env.broker_url.trim_start_matches("http://");
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream
        .write_all(b"POST /kyc-sessions HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    let mut answer = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut answer));
    read.await
        .expect("the broker closes the connection")
        .unwrap();
    env.stop().await;
}

#[tokio::test]
async fn without_callers_authentication_must_be_disabled_explicitly() {
    let env = TestEnv::with(SimConfig::default(), |s| {
        s.auth.disabled = true;
        s.auth.callers.clear();
    })
    .await;
    let response = reqwest::Client::new()
        .post(format!("{}/kyc-sessions", env.broker_url))
        .json(&json!({"flow": "access"}))
        .send()
        .await
        .unwrap();
    expect_created(response).await;
    env.stop().await;
}
