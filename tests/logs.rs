//! Logs are JSON lines naming the request id, the caller and the flow, with one line per
//! finished request, also for one its client abandoned. One test per binary runs in this process
//! (a process has one global subscriber); another runs the broker binary.

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

/// The human-readable format (`log.format = "pretty"`) shows a request's fields through the
/// `tracing` span `request` around it. The real binary, so that this test's process keeps its
/// one JSON subscriber.
#[tokio::test]
async fn in_the_human_readable_format_each_line_of_a_request_names_it() {
    use std::io::{BufRead, BufReader};
    let ledger = sqlite_ledger();
    let sim = giroident_broker::sim::start(giroident_broker::sim::SimConfig::default())
        .await
        .expect("simulator");
    let digest = giroident_broker::config::to_hex(&giroident_broker::config::sha256(
        TEST_API_KEY.as_bytes(),
    ));
    let callers = format!(r#"[{{name = "pretty", key_sha256 = "{digest}", flows = ["access"]}}]"#);
    let mut command = broker_command(&ledger);
    command.envs([
        ("GIROIDENT_BROKER_LOG__FORMAT", "pretty"),
        ("GIROIDENT_BROKER_LOG__FILTER", "info"),
        ("GIROIDENT_BROKER_SERVER__LISTEN", "127.0.0.1:0"),
        ("GIROIDENT_BROKER_ADMIN__LISTEN", "127.0.0.1:0"),
        ("GIROIDENT_BROKER_FINAPI__ACCESS_URL", &sim.base_url()),
        (
            "GIROIDENT_BROKER_FINAPI__PROCESS_CONTROLLER_URL",
            &sim.base_url(),
        ),
        ("GIROIDENT_BROKER_FINAPI__ALLOW_INSECURE_HTTP", "true"),
        (
            "GIROIDENT_BROKER_FINAPI__CLIENT_ID",
            giroident_broker::sim::DEMO_CLIENT_ID,
        ),
        (
            "GIROIDENT_BROKER_FINAPI__CLIENT_SECRET",
            giroident_broker::sim::DEMO_CLIENT_SECRET,
        ),
        ("GIROIDENT_BROKER_AUTH__CALLERS", &callers),
    ]);
    let mut child = command
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("the broker binary starts");
    let stderr = child.stderr.take().expect("stderr");
    let (lines_tx, lines_rx) = std::sync::mpsc::channel::<String>();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = lines_tx.send(line);
        }
    });
    let next_line = |what: &str| loop {
        let line = lines_rx
            .recv_timeout(std::time::Duration::from_secs(20))
            .unwrap_or_else(|_| panic!("no line with {what}"));
        if line.contains(what) {
            return line;
        }
    };
    let listening = next_line("broker listening");
    let addr = listening
        .split_whitespace()
        .find_map(|word| word.strip_prefix("addr="))
        .expect("the address")
        .to_owned();
    let response = client_with_key(TEST_API_KEY)
        .post(format!("http://{addr}/kyc-sessions"))
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
