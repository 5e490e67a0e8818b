//! OpenTelemetry traces: an OTLP/HTTP receiver started here on 127.0.0.1 decodes what the
//! broker exports with the published protocol types, and the tests check the traces of both
//! flows (the caller's trace continued, parent/child links, step names), that no secret is in
//! any exported byte, the trace ids in log lines and problem bodies, and `traceparent` towards
//! finAPI only when the setting says so.
//!
//! One subscriber per process: every test of this binary shares the receiver and tells its
//! spans apart by the trace ids it sent.

mod common;

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use axum::body::Bytes;
use common::*;
use giroident_broker::sim::{self, FaultRule, SimClient, SimConfig};
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::any_value::Value as AnyValue;
use prost::Message;
use serde_json::{Value, json};

/// One exported span, decoded.
#[derive(Debug, Clone)]
struct Span {
    trace_id: String,
    span_id: String,
    parent_span_id: String,
    name: String,
    kind: i32,
    attributes: HashMap<String, String>,
    service_name: String,
}

/// What the receiver got: every request body as it arrived, and the spans in them.
#[derive(Default)]
struct Received {
    bodies: Vec<Bytes>,
    spans: Vec<Span>,
}

struct Harness {
    received: Arc<Mutex<Received>>,
    logs: CapturedLogs,
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn text(value: &Option<opentelemetry_proto::tonic::common::v1::AnyValue>) -> String {
    match value.as_ref().and_then(|v| v.value.as_ref()) {
        Some(AnyValue::StringValue(s)) => s.clone(),
        Some(AnyValue::IntValue(i)) => i.to_string(),
        Some(AnyValue::BoolValue(b)) => b.to_string(),
        Some(AnyValue::DoubleValue(d)) => d.to_string(),
        other => format!("{other:?}"),
    }
}

fn decode(body: &[u8]) -> Vec<Span> {
    let request = ExportTraceServiceRequest::decode(body).expect("OTLP protobuf");
    let mut spans = Vec::new();
    for resource_spans in request.resource_spans {
        let service_name = resource_spans
            .resource
            .iter()
            .flat_map(|r| &r.attributes)
            .find(|kv| kv.key == "service.name")
            .map(|kv| text(&kv.value))
            .unwrap_or_default();
        for scope in resource_spans.scope_spans {
            for span in scope.spans {
                spans.push(Span {
                    trace_id: hex(&span.trace_id),
                    span_id: hex(&span.span_id),
                    parent_span_id: hex(&span.parent_span_id),
                    name: span.name,
                    kind: span.kind,
                    attributes: span
                        .attributes
                        .iter()
                        .map(|kv| (kv.key.clone(), text(&kv.value)))
                        .collect(),
                    service_name: service_name.clone(),
                });
            }
        }
    }
    spans
}

/// The receiver (on a runtime of its own: each test has its own) and the global subscriber
/// exporting to it, started once per process.
fn harness() -> &'static Harness {
    static HARNESS: OnceLock<Harness> = OnceLock::new();
    HARNESS.get_or_init(|| {
        let received = Arc::new(Mutex::new(Received::default()));
        let store = received.clone();
        let (addr_tx, addr_rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(async move {
                let app = axum::Router::new().route(
                    "/v1/traces",
                    axum::routing::post(move |body: Bytes| {
                        let store = store.clone();
                        async move {
                            let spans = decode(&body);
                            let mut received = store.lock().unwrap();
                            received.spans.extend(spans);
                            received.bodies.push(body);
                            (
                                [("content-type", "application/x-protobuf")],
                                Vec::<u8>::new(),
                            )
                        }
                    }),
                );
                let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
                addr_tx.send(listener.local_addr().unwrap()).unwrap();
                axum::serve(listener, app).await.unwrap();
            });
        });
        let addr = addr_rx.recv().unwrap();
        let url = format!("http://{addr}");
        let settings = common::tracing_settings(
            &url,
            "parentbased_always_on",
            "x-collector-key=collector-secret-4b1d",
            5000,
            4096,
        );
        let (logs, guard) =
            CapturedLogs::install_exporting("info,giroident_broker=debug", &settings);
        std::mem::forget(guard);
        Harness { received, logs }
    })
}

/// A fresh W3C trace id and a parent span id, and the `traceparent` carrying them.
fn new_trace() -> (String, String, String) {
    let trace_id = uuid::Uuid::new_v4().simple().to_string();
    let parent = uuid::Uuid::new_v4().simple().to_string()[..16].to_owned();
    let header = format!("00-{trace_id}-{parent}-01");
    (trace_id, parent, header)
}

/// Waits until the spans of `trace_id` include every name in `names`; returns all of them.
async fn spans_of(trace_id: &str, names: &[&str]) -> Vec<Span> {
    let received = &harness().received;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let spans: Vec<Span> = received
            .lock()
            .unwrap()
            .spans
            .iter()
            .filter(|s| s.trace_id == trace_id)
            .cloned()
            .collect();
        if names.iter().all(|n| spans.iter().any(|s| s.name == *n)) {
            return spans;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "spans of {trace_id} never arrived: want {names:?}, have {:?}",
            spans.iter().map(|s| &s.name).collect::<Vec<_>>()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits until some span matches `found`; returns all spans received so far.
async fn spans_until(found: impl Fn(&[Span]) -> bool) -> Vec<Span> {
    let received = &harness().received;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let spans = received.lock().unwrap().spans.clone();
        if found(&spans) {
            return spans;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the spans never arrived; roots: {:?}",
            spans
                .iter()
                .filter(|s| s.parent_span_id.is_empty())
                .map(|s| (&s.name, s.span_id.clone()))
                .collect::<Vec<_>>()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A root span named `root` with a child named `child`.
fn root_with_child(spans: &[Span], root: &str, child: &str) -> bool {
    spans.iter().any(|r| {
        r.name == root
            && r.parent_span_id.is_empty()
            && spans.iter().any(|c| {
                c.name == child && c.parent_span_id == r.span_id && c.trace_id == r.trace_id
            })
    })
}

async fn start_traced(env: &TestEnv, traceparent: &str, body: Value) -> reqwest::Response {
    env.http
        .post(format!("{}/kyc-sessions", env.broker_url))
        .header("traceparent", traceparent)
        .json(&body)
        .send()
        .await
        .unwrap()
}

/// Every span's parent is the caller's span (the request span) or another span of the trace,
/// and every span descends from the one request span.
fn assert_one_tree(spans: &[Span], caller_span: &str) -> Span {
    let requests: Vec<&Span> = spans.iter().filter(|s| s.name == "request").collect();
    assert_eq!(requests.len(), 1, "{spans:#?}");
    let request = requests[0].clone();
    assert_eq!(request.parent_span_id, caller_span, "request span's parent");
    assert_eq!(request.kind, 2, "the request span is a server span");
    assert_eq!(request.service_name, "broker-under-test");
    let by_id: HashMap<&str, &Span> = spans.iter().map(|s| (s.span_id.as_str(), s)).collect();
    for span in spans.iter().filter(|s| s.name != "request") {
        let mut at = span;
        let mut hops = 0;
        while at.span_id != request.span_id {
            at = by_id
                .get(at.parent_span_id.as_str())
                .unwrap_or_else(|| panic!("{} has a parent outside the trace", span.name));
            hops += 1;
            assert!(hops < 20);
        }
    }
    request
}

fn child_names<'a>(spans: &'a [Span], parent: &Span) -> Vec<&'a str> {
    spans
        .iter()
        .filter(|s| s.parent_span_id == parent.span_id)
        .map(|s| s.name.as_str())
        .collect()
}

#[tokio::test]
async fn a_standalone_session_is_one_trace_continuing_the_callers() {
    harness();
    let env = TestEnv::start().await;
    let (trace_id, caller_span, traceparent) = new_trace();
    let response = start_traced(
        &env,
        &traceparent,
        json!({"flow": "standalone", "clientReference": "trace-standalone-1"}),
    )
    .await;
    assert_eq!(response.status(), 201);
    let spans = spans_of(
        &trace_id,
        &[
            "request",
            "finapi.create_process",
            "finapi.exchange_process_token",
        ],
    )
    .await;
    let request = assert_one_tree(&spans, &caller_span);
    assert_eq!(request.attributes["http.route"], "/kyc-sessions");
    assert_eq!(request.attributes["http.response.status_code"], "201");
    // The log lines' fields (request id, path, caller, flow, the ids) are not exported again.
    let mut keys: Vec<&str> = request.attributes.keys().map(String::as_str).collect();
    keys.sort_unstable();
    assert_eq!(
        keys,
        [
            "http.request.method",
            "http.response.status_code",
            "http.route"
        ]
    );
    let children = child_names(&spans, &request);
    for name in ["finapi.create_process", "finapi.exchange_process_token"] {
        assert!(
            children.contains(&name),
            "{name} under request: {children:?}"
        );
    }
    let exchange = spans
        .iter()
        .find(|s| s.name == "finapi.exchange_process_token")
        .unwrap();
    assert_eq!(exchange.kind, 3, "finAPI calls are client spans");
    assert_eq!(exchange.attributes["finapi.step"], "exchange_process_token");
    assert_eq!(exchange.attributes["finapi.attempt"], "1");
    assert_eq!(exchange.attributes["http.request.method"], "GET");
    assert_eq!(
        exchange.attributes["url.template"],
        "/api/v1/processes/{processToken}"
    );
    assert_eq!(exchange.attributes["http.response.status_code"], "200");
    assert_eq!(exchange.attributes["server.address"], "127.0.0.1");
    // Exactly the README's attributes of a successful first attempt: none the span's name
    // already says, no configured client name (each one costs export work per call).
    let mut keys: Vec<&str> = exchange.attributes.keys().map(String::as_str).collect();
    keys.sort_unstable();
    assert_eq!(
        keys,
        [
            "finapi.attempt",
            "finapi.step",
            "http.request.method",
            "http.response.status_code",
            "server.address",
            "server.port",
            "url.template"
        ]
    );
    env.stop().await;
}

#[tokio::test]
async fn an_access_session_traces_its_ledger_and_its_retries() {
    harness();
    let env = TestEnv::start().await;
    env.sim.add_fault(FaultRule {
        endpoint: CREATE_USER.into(),
        status: Some(503),
        count: Some(1),
        ..FaultRule::default()
    });
    let (trace_id, caller_span, traceparent) = new_trace();
    let response = start_traced(
        &env,
        &traceparent,
        json!({"flow": "access", "clientReference": "trace-access-1"}),
    )
    .await;
    assert_eq!(response.status(), 201);
    let spans = spans_of(
        &trace_id,
        &[
            "request",
            "client_token.lookup",
            "finapi.client_token",
            "finapi.create_user",
            "finapi.user_token",
            "ledger.insert_intent",
            "ledger.activate",
        ],
    )
    .await;
    let request = assert_one_tree(&spans, &caller_span);
    let children = child_names(&spans, &request);
    for name in [
        "client_token.lookup",
        "finapi.create_user",
        "finapi.user_token",
        "ledger.insert_intent",
    ] {
        assert!(
            children.contains(&name),
            "{name} under request: {children:?}"
        );
    }
    let lookup = spans
        .iter()
        .find(|s| s.name == "client_token.lookup")
        .unwrap();
    assert_eq!(lookup.attributes["client_token.cache"], "miss");
    // The cold cache's fetch belongs to the request that waited for it.
    let token_call = spans
        .iter()
        .find(|s| s.name == "finapi.client_token")
        .unwrap();
    assert_eq!(token_call.parent_span_id, lookup.span_id);
    assert_eq!(token_call.attributes["url.template"], "/api/v2/oauth/token");
    let mut creates: Vec<&Span> = spans
        .iter()
        .filter(|s| s.name == "finapi.create_user")
        .collect();
    creates.sort_by_key(|s| s.attributes["finapi.attempt"].clone());
    assert_eq!(creates.len(), 2, "{creates:#?}");
    assert_eq!(creates[0].attributes["finapi.attempt"], "1");
    assert_eq!(creates[0].attributes["http.response.status_code"], "503");
    assert_eq!(creates[0].attributes["error.type"], "503");
    assert!(!creates[0].attributes.contains_key("finapi.retry_reason"));
    assert_eq!(creates[1].attributes["finapi.attempt"], "2");
    assert_eq!(creates[1].attributes["finapi.retry_reason"], "503");
    assert_eq!(creates[1].attributes["http.response.status_code"], "201");
    env.stop().await;
}

#[tokio::test]
async fn a_session_without_traceparent_starts_a_trace_and_problems_name_it() {
    harness();
    let env = TestEnv::start().await;
    // No traceparent: a new trace, the request span its root, its id in the problem body.
    let response = env
        .http
        .post(format!("{}/kyc-sessions", env.broker_url))
        .header("x-request-id", "trace-problem-1")
        .header("content-type", "application/json")
        .body(r#"{"flow":"#)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 400);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["requestId"], "trace-problem-1");
    let trace_id = body["traceId"].as_str().expect("traceId").to_owned();
    assert_eq!(trace_id.len(), 32);
    let spans = spans_of(&trace_id, &["request"]).await;
    assert_one_tree(&spans, "");

    // With a traceparent: the caller's trace id.
    let (trace_id, _, traceparent) = new_trace();
    let response = env
        .http
        .post(format!("{}/kyc-sessions", env.broker_url))
        .header("traceparent", traceparent)
        .json(&json!({"flow": "video"}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 400);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["traceId"], trace_id.as_str());
    env.stop().await;
}

#[tokio::test]
async fn background_work_has_traces_of_its_own() {
    harness();
    // Client tokens living 2 s are refreshed in the background after 1 s.
    let env = TestEnv::with(
        SimConfig {
            client_token_ttl: Duration::from_secs(2),
            ..SimConfig::default()
        },
        |_| {},
    )
    .await;
    // A lookup after half the token's life starts the refresh: sessions go on until its
    // trace arrives.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        env.access_session().await;
        let spans = harness().received.lock().unwrap().spans.clone();
        if root_with_child(&spans, "client_token.refresh", "finapi.client_token") {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no client_token.refresh trace"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    spans_until(|spans| root_with_child(spans, "reaper.round", "ledger.claim_due")).await;
    env.stop().await;
}

#[tokio::test]
async fn json_log_lines_carry_the_trace_and_span_ids() {
    let logs = &harness().logs;
    let env = TestEnv::start().await;
    let (trace_id, _, traceparent) = new_trace();
    let response = start_traced(
        &env,
        &traceparent,
        json!({"flow": "standalone", "clientReference": "trace-log-1"}),
    )
    .await;
    assert_eq!(response.status(), 201);
    let spans = spans_of(&trace_id, &["request"]).await;
    let request = spans.iter().find(|s| s.name == "request").unwrap();
    env.stop().await;
    let text = logs.text();
    let finished = text
        .lines()
        .filter_map(|line| serde_json::from_str::<Value>(line).ok())
        .find(|line| {
            line["message"] == "request finished" && line["span"]["trace_id"] == trace_id.as_str()
        })
        .unwrap_or_else(|| panic!("no log line of trace {trace_id}"));
    assert_eq!(finished["span"]["span_id"], request.span_id.as_str());
    // Lines written inside a finAPI call's span still show the request span.
    let call_line = text
        .lines()
        .filter_map(|line| serde_json::from_str::<Value>(line).ok())
        .find(|line| {
            line["message"] == "finAPI call" && line["span"]["trace_id"] == trace_id.as_str()
        })
        .unwrap_or_else(|| panic!("no finAPI call line of trace {trace_id}"));
    assert_eq!(
        call_line["span"]["request_id"],
        finished["span"]["request_id"]
    );
}

#[tokio::test]
async fn traceparent_reaches_finapi_only_when_the_setting_says_so() {
    harness();
    for propagate in [false, true] {
        let env = TestEnv::with(SimConfig::default(), |s| {
            s.tracing.propagate_to_finapi = propagate;
        })
        .await;
        let (trace_id, _, traceparent) = new_trace();
        let response = start_traced(
            &env,
            &traceparent,
            json!({"flow": "standalone", "clientReference": "trace-propagate-1"}),
        )
        .await;
        assert_eq!(response.status(), 201);
        let spans = spans_of(&trace_id, &["finapi.create_process"]).await;
        let records = env.sim.psu_headers();
        let sent: Vec<Option<String>> = records
            .values()
            .flatten()
            .map(|r| r.traceparent.clone())
            .collect();
        assert!(sent.len() >= 2, "{records:?}");
        if !propagate {
            assert!(sent.iter().all(Option::is_none), "{sent:?}");
            env.stop().await;
            continue;
        }
        // Each call carries the caller's trace, its parent being the call's own span.
        let create = &records[CREATE_PROCESS][0];
        let header = create.traceparent.as_deref().expect("traceparent sent");
        let parts: Vec<&str> = header.split('-').collect();
        assert_eq!(parts.len(), 4, "{header}");
        assert_eq!(parts[1], trace_id);
        let call_span = spans
            .iter()
            .find(|s| s.name == "finapi.create_process")
            .unwrap();
        assert_eq!(parts[2], call_span.span_id);
        assert!(
            sent.iter()
                .all(|t| t.as_deref().is_some_and(|t| t.contains(&trace_id)))
        );
        env.stop().await;
    }
}

#[tokio::test]
async fn no_secret_appears_in_any_exported_byte() {
    let received = &harness().received;
    const CLIENT_SECRET: &str = "trace-leak-client-secret-8e1f";
    let sim_config = SimConfig {
        clients: vec![SimClient::new(sim::DEMO_CLIENT_ID, CLIENT_SECRET)],
        ..SimConfig::default()
    };
    let env = TestEnv::with(sim_config, |s| {
        s.finapi.client_secret = Some(CLIENT_SECRET.into());
        s.tracing.propagate_to_finapi = true;
    })
    .await;
    let reference = "trace-leak-raw-reference-5a7c";
    let email = "trace.leak@example.com";
    let phone = "+49 30 1234 5678";
    let psu_ip = "203.0.113.77";
    let mut trace_ids = Vec::new();
    let mut tokens = Vec::new();
    for body in [
        json!({"flow": "standalone", "clientReference": "trace-leak-standalone"}),
        json!({"flow": "access", "clientReference": reference, "email": email, "phone": phone}),
        json!({"flow": "access", "clientReference": reference}),
    ] {
        let (trace_id, _, traceparent) = new_trace();
        let response = env
            .http
            .post(format!("{}/kyc-sessions", env.broker_url))
            .header("traceparent", traceparent)
            .header("psu-ip-address", psu_ip)
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 201);
        let body: Value = response.json().await.unwrap();
        tokens.push(body["accessToken"].as_str().unwrap().to_owned());
        trace_ids.push(trace_id);
    }
    let identity = env
        .http
        .get(format!("{}/identities/{reference}", env.broker_url))
        .send()
        .await
        .unwrap();
    assert_eq!(identity.status(), 200);
    let deleted = env
        .http
        .delete(format!("{}/identities/{reference}", env.broker_url))
        .send()
        .await
        .unwrap();
    assert!(deleted.status().is_success(), "{}", deleted.status());
    for trace_id in &trace_ids {
        spans_of(trace_id, &["request"]).await;
    }
    let (client_tokens, user_tokens) = env.sim.state().live_tokens();
    let passwords = env.sim.state().user_passwords();
    let process_tokens = env.sim.state().process_exchanges();
    env.stop().await;

    let mut never: Vec<(&str, String)> = vec![
        ("client secret", CLIENT_SECRET.into()),
        ("API key", TEST_API_KEY.into()),
        ("identity password key", TEST_PASSWORD_KEY.into()),
        ("raw client reference", reference.into()),
        ("e-mail", email.into()),
        ("phone", phone.into()),
        ("PSU address", psu_ip.into()),
        ("collector header", "collector-secret-4b1d".into()),
    ];
    never.extend(
        process_tokens
            .into_iter()
            .map(|(t, ..)| ("process token", t)),
    );
    never.extend(client_tokens.into_iter().map(|t| ("client token", t)));
    never.extend(user_tokens.into_iter().map(|t| ("user token", t)));
    never.extend(tokens.into_iter().map(|t| ("handed-out token", t)));
    never.extend(passwords.into_iter().map(|p| ("user password", p)));
    assert!(
        never.len() >= 12,
        "too few secrets: the test would prove nothing"
    );
    let received = received.lock().unwrap();
    assert!(!received.bodies.is_empty());
    for body in &received.bodies {
        for (what, secret) in &never {
            assert!(
                !body.windows(secret.len()).any(|w| w == secret.as_bytes()),
                "a {what} is in an exported span"
            );
        }
    }
}
