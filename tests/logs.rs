//! Logs are JSON lines naming the request id, the caller and the flow, with one line per
//! finished request, also for one its client abandoned. A process has one global subscriber:
//! the tests of this binary share it, and each reads the lines of its own request ids; the
//! human-readable format is checked on the broker binary.

mod common;

use std::sync::OnceLock;

use common::*;
use giroident_broker::config::LogFormat;
use serde_json::{Value, json};

/// The captured JSON lines at `info`, installed by the first test that asks.
fn logs() -> &'static CapturedLogs {
    static LOGS: OnceLock<CapturedLogs> = OnceLock::new();
    LOGS.get_or_init(|| CapturedLogs::install(LogFormat::Json, "info"))
}

/// The lines logged in the request `request_id`.
fn lines_of(request_id: &str) -> Vec<Value> {
    logs()
        .text()
        .lines()
        .filter_map(|line| serde_json::from_str::<Value>(line).ok())
        .filter(|line| line["span"]["request_id"] == request_id)
        .collect()
}

#[tokio::test]
async fn a_successful_session_at_info_is_one_line_with_everything_an_operator_needs() {
    let logs = logs();
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
        eventually(std::time::Duration::from_secs(5), || finished(logs) > 0).await,
        "an abandoned request wrote no request finished line: {}",
        logs.text()
    );
    env.stop().await;
    assert_eq!(finished(logs), 1);
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

/// `503 OVERLOADED`, `503 STORE_UNAVAILABLE` and `504 REQUEST_TIMEOUT` were logged at warn as
/// "request failed upstream", though finAPI had no part in them: an operator chasing finAPI
/// found the broker shedding load or its ledger down. Shedding load is a refusal (info), as
/// draining is; the ledger's failure says so; finAPI's own failures stay "request failed
/// upstream". (`REQUEST_TIMEOUT` has no reliable trigger here; `src/api/error.rs` tests it.)
#[tokio::test]
async fn failures_that_are_not_finapis_are_not_logged_as_upstream_failures() {
    let logs = logs();
    let ledger = sqlite_ledger();
    let sim = giroident_broker::sim::start(giroident_broker::sim::SimConfig::default())
        .await
        .expect("simulator");
    let mut settings = settings_with_ledger(&sim, &ledger);
    settings.limits.max_in_flight = 1;
    let env = TestEnv::with_settings(sim, &settings).await;
    let post = |request_id: &str, body: Value| {
        env.http
            .post(format!("{}/kyc-sessions", env.broker_url))
            .header("x-request-id", request_id)
            .json(&body)
            .send()
    };

    // One slow session holds the only place in flight; the next one is shed.
    env.sim.add_fault(giroident_broker::sim::FaultRule {
        endpoint: CREATE_PROCESS.into(),
        latency_ms: Some(1_000),
        count: Some(1),
        ..Default::default()
    });
    let slow = tokio::spawn(post(
        "log-test-slow",
        json!({"flow": "standalone", "clientReference": "c-slow"}),
    ));
    let seen = || {
        env.sim
            .state()
            .seen_request_ids()
            .iter()
            .any(|id| id == "log-test-slow")
    };
    assert!(eventually(std::time::Duration::from_secs(5), seen).await);
    let shed = post("log-test-shed", json!({"flow": "access"}))
        .await
        .unwrap();
    expect_problem(shed, 503, "OVERLOADED").await;
    assert_eq!(slow.await.unwrap().unwrap().status(), 201);

    // finAPI refuses: an upstream failure.
    env.sim.add_fault(giroident_broker::sim::FaultRule {
        endpoint: CREATE_PROCESS.into(),
        status: Some(400),
        count: Some(1),
        ..Default::default()
    });
    let refused = post(
        "log-test-upstream",
        json!({"flow": "standalone", "clientReference": "c-up"}),
    )
    .await
    .unwrap();
    expect_problem(refused, 502, "UPSTREAM_REJECTED").await;

    // The ledger's files overwritten in place: the ledger fails, finAPI is never asked.
    common::overwrite_sqlite_ledger(&ledger);
    let unavailable = post("log-test-ledger", json!({"flow": "access"}))
        .await
        .unwrap();
    expect_problem(unavailable, 503, "STORE_UNAVAILABLE").await;
    env.stop().await;

    let error_line = |request_id: &str| {
        let lines: Vec<Value> = lines_of(request_id)
            .into_iter()
            .filter(|line| line["code"].is_string())
            .collect();
        assert_eq!(lines.len(), 1, "{request_id}: {lines:?}\n{}", logs.text());
        lines[0].clone()
    };
    let shed = error_line("log-test-shed");
    assert_eq!(shed["code"], "OVERLOADED");
    assert_eq!(shed["level"], "INFO", "{shed}");
    assert_eq!(shed["message"], "request refused", "{shed}");
    let upstream = error_line("log-test-upstream");
    assert_eq!(upstream["level"], "WARN", "{upstream}");
    assert_eq!(upstream["message"], "request failed upstream", "{upstream}");
    let ledger = error_line("log-test-ledger");
    assert_eq!(ledger["code"], "STORE_UNAVAILABLE");
    assert_eq!(ledger["level"], "WARN", "{ledger}");
    assert_eq!(
        ledger["message"], "request failed: the identity ledger is unavailable",
        "{ledger}"
    );
}

/// The human-readable format (`log.format = "pretty"`) shows a request's fields through the
/// `tracing` span `request` around it. The real binary, so that this test's process keeps its
/// one JSON subscriber.
#[tokio::test]
async fn in_the_human_readable_format_each_line_of_a_request_names_it() {
    let ledger = sqlite_ledger();
    let sim = giroident_broker::sim::start(giroident_broker::sim::SimConfig::default())
        .await
        .expect("simulator");
    let callers = test_caller("pretty", r#"["access"]"#);
    let mut command = broker_command_on(&ledger, &sim.base_url());
    command.envs([
        ("GIROIDENT_BROKER_LOG__FORMAT", "pretty"),
        ("GIROIDENT_BROKER_AUTH__CALLERS", &callers),
    ]);
    let (lines_tx, lines_rx) = std::sync::mpsc::channel::<String>();
    let (mut child, url) = spawn_broker_binary(command, Some(lines_tx));
    let next_line = |what: &str| loop {
        let line = lines_rx
            .recv_timeout(std::time::Duration::from_secs(20))
            .unwrap_or_else(|_| panic!("no line with {what}"));
        if line.contains(what) {
            return line;
        }
    };
    let response = client_with_key(TEST_API_KEY)
        .post(format!("{url}/kyc-sessions"))
        .header("x-request-id", "pretty-line-1")
        .json(&json!({"flow": "access"}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 201);
    let finished = next_line("request finished");
    let _ = child.kill();
    let _ = child.wait();
    assert!(
        finished
            .contains(r#"request{request_id="pretty-line-1" method="POST" path="/kyc-sessions"}"#),
        "{finished}"
    );
    assert!(finished.contains("status=201"), "{finished}");
}
