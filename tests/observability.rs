//! The machine-readable side: the OpenAPI document (checked in, and matched by every answer),
//! the Prometheus metrics on the admin listener, and the README's configuration reference.

mod common;

use std::collections::BTreeMap;

use common::*;
use giroident_broker::config::{DEFAULT_TOML, ENV_PREFIX};
use giroident_broker::sim::{FaultRule, SimConfig};
use proptest::prelude::*;
use serde_json::{Value, json};

fn document() -> Value {
    serde_json::from_str(giroident_broker::api::openapi_document(
        giroident_broker::config::FlowKind::Standalone,
    ))
    .expect("JSON")
}

/// A validator for one component schema, resolving `$ref`s inside the whole document.
fn validator(doc: &Value, schema: &str) -> jsonschema::Validator {
    let mut root = doc.clone();
    root["$ref"] = json!(format!("#/components/schemas/{schema}"));
    jsonschema::validator_for(&root).expect("valid schema")
}

#[tokio::test]
async fn the_served_document_is_the_checked_in_one() {
    let env = TestEnv::start().await;
    let served: Value = env
        .http
        .get(format!("{}/openapi.json", env.broker_url))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/docs/openapi.json");
    let checked_in: Value =
        serde_json::from_str(&std::fs::read_to_string(path).expect("docs/openapi.json")).unwrap();
    assert_eq!(
        served, checked_in,
        "docs/openapi.json is stale: run `cargo run -- openapi > docs/openapi.json`"
    );
    assert_eq!(served["openapi"], "3.1.0");
    assert_eq!(
        served["components"]["securitySchemes"]["api_key"]["name"],
        "X-Api-Key"
    );
    env.stop().await;
}

/// Sends a request and checks the answer against the document: the status is documented for
/// the operation, and the body matches the documented schema.
async fn check_against_document(doc: &Value, request: reqwest::RequestBuilder) -> (u16, Value) {
    let (client, built) = request.build_split();
    let built = built.unwrap();
    let method = built.method().as_str().to_ascii_lowercase();
    let path = built.url().path().to_owned();
    let response = client.execute(built).await.unwrap();
    let status = response.status().as_u16();
    let content_type = response
        .headers()
        .get("content-type")
        .map(|v| v.to_str().unwrap().to_owned());
    let text = response.text().await.unwrap();
    let operation = &doc["paths"][&path][&method];
    assert!(operation.is_object(), "{method} {path} is not documented");
    let documented = &operation["responses"][status.to_string()];
    assert!(
        documented.is_object(),
        "{method} {path} answered {status}, which the document does not list: {text}"
    );
    let body: Value = if text.is_empty() {
        Value::Null
    } else {
        serde_json::from_str(&text).unwrap()
    };
    if let Some(content) = documented["content"].as_object() {
        let content_type = content_type.expect("a documented body has a content type");
        let (media, spec) = content.iter().next().unwrap();
        assert_eq!(&content_type, media, "{method} {path} {status}");
        if let Some(reference) = spec["schema"]["$ref"].as_str() {
            let name = reference.rsplit('/').next().unwrap();
            let errors: Vec<String> = validator(doc, name)
                .iter_errors(&body)
                .map(|e| e.to_string())
                .collect();
            assert!(
                errors.is_empty(),
                "{method} {path} {status}: {body} does not match {name}: {errors:?}"
            );
        }
    } else {
        assert!(
            text.is_empty(),
            "{method} {path} {status} has an undocumented body"
        );
    }
    (status, body)
}

#[tokio::test]
async fn every_answer_matches_the_document() {
    let doc = document();
    // The validator really checks: a problem without its fields does not match.
    assert!(!validator(&doc, "Problem").is_valid(&json!({"status": "x"})));
    assert!(!validator(&doc, "SessionBody").is_valid(&json!({"accessToken": 1})));
    let env = TestEnv::start().await;
    let url = |path: &str| format!("{}{path}", env.broker_url);
    let post = |body: &str| {
        env.http
            .post(url("/kyc-sessions"))
            .header("content-type", "application/json")
            .body(body.to_owned())
    };
    let (_, access) =
        check_against_document(&doc, post(r#"{"flow":"access","email":"a@b.de"}"#)).await;
    check_against_document(
        &doc,
        post(r#"{"flow":"standalone","clientReference":"c-1"}"#),
    )
    .await;
    for body in [
        r#"{"flow":"#,
        r#"{"flow":"video"}"#,
        r#"{"flow":"standalone"}"#,
    ] {
        check_against_document(&doc, post(body)).await;
    }
    check_against_document(&doc, post(&"x".repeat(20_000))).await;
    check_against_document(&doc, env.http.post(url("/kyc-sessions")).body("{}")).await;
    check_against_document(
        &doc,
        reqwest::Client::new()
            .post(url("/kyc-sessions"))
            .json(&json!({})),
    )
    .await;
    env.sim.add_fault(FaultRule {
        endpoint: CREATE_USER.into(),
        status: Some(503),
        retry_after: Some(1),
        count: Some(1),
        ..FaultRule::default()
    });
    check_against_document(&doc, post(r#"{"flow":"access"}"#)).await;
    let token = access["accessToken"].as_str().unwrap();
    let delete = || env.http.delete(url("/kyc-sessions/current"));
    let (status, _) = check_against_document(&doc, delete().bearer_auth(token)).await;
    assert_eq!(status, 204);
    check_against_document(&doc, delete().bearer_auth(token)).await;
    check_against_document(&doc, delete()).await;
    for path in ["/livez", "/readyz", "/openapi.json"] {
        check_against_document(&doc, env.http.get(url(path))).await;
    }
    env.stop().await;
}

fn json_value() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        "[a-z]{1,8}@[a-z]{1,8}\\.de".prop_map(Value::from),
        "[A-Za-z0-9._:@+-]{0,130}".prop_map(Value::from),
        "[0-9 +()/-]{0,52}".prop_map(Value::from),
        prop_oneof![Just("standalone"), Just("access"), Just("video")].prop_map(Value::from),
        "\\PC{0,20}".prop_map(Value::from),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(3000))]

    /// A body the document says is valid is never refused as malformed: it parses, and only
    /// the cross-field rules the document states in prose may still refuse it.
    #[test]
    fn bodies_valid_per_the_document_are_not_malformed(
        fields in prop::collection::btree_map(
            prop_oneof![Just("flow"), Just("clientReference"), Just("email"), Just("phone"), Just("other")],
            json_value(),
            0..5,
        )
    ) {
        let doc = document();
        let body: Value = fields.into_iter().map(|(k, v)| (k.to_owned(), v)).collect::<serde_json::Map<_, _>>().into();
        if validator(&doc, "CreateSessionBody").is_valid(&body) {
            let parsed = serde_json::from_value::<giroident_broker::api::CreateSessionBody>(body.clone());
            prop_assert!(parsed.is_ok(), "{body} is valid per the document but refused: {parsed:?}");
        }
    }
}

#[tokio::test]
async fn metrics_name_routes_callers_steps_and_outcomes() {
    let env = TestEnv::start().await;
    env.access_session().await;
    env.standalone_session("metrics-1").await;
    let text = env.metrics_text().await;
    for expected in [
        r#"broker_http_requests_total{route="/kyc-sessions",method="POST",status="201",caller="demo"}"#,
        r#"broker_http_request_duration_seconds_bucket{route="/kyc-sessions",method="POST",status="201",caller="demo",le="#,
        r#"broker_finapi_calls_total{service="access",step="create_user",outcome="201",finapi_client="default"}"#,
        r#"broker_finapi_calls_total{service="access",step="user_token",outcome="200",finapi_client="default"}"#,
        r#"broker_finapi_calls_total{service="process_controller",step="create_process",outcome="201",finapi_client="default"}"#,
        r#"broker_finapi_calls_total{service="process_controller",step="exchange_process_token",outcome="200",finapi_client="default"}"#,
        r#"broker_finapi_call_duration_seconds_bucket{service="access",step="client_token",outcome="200",finapi_client="default",le="#,
        r#"broker_client_token_cache_lookups_total{result="miss"}"#,
        r#"broker_client_token_fetches_total{trigger="request",outcome="ok"}"#,
        r#"broker_kyc_sessions_total{flow="access",outcome="created"}"#,
        r#"broker_kyc_sessions_total{flow="standalone",outcome="created"}"#,
        "broker_http_requests_in_flight",
        r#"broker_finapi_circuit_open{service="access",finapi_client="default"} 0"#,
        r#"broker_finapi_circuit_open{service="process_controller",finapi_client="default"} 0"#,
        "broker_finapi_retries_total",
        "broker_orphaned_users_total",
    ] {
        assert!(
            text.contains(expected),
            "{expected} missing from /metrics:\n{text}"
        );
    }
    // No ids or tokens in labels: every label value is from a small known set.
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        assert!(!line.contains("gib-"), "a user id in a label: {line}");
    }
    // Metrics and probes are on the admin listener; metrics are not on the main one.
    let main = env
        .http
        .get(format!("{}/metrics", env.broker_url))
        .send()
        .await
        .unwrap();
    assert_eq!(main.status(), 404);
    for probe in ["/livez", "/readyz"] {
        let admin = env
            .http
            .get(format!("{}{probe}", env.admin_url))
            .send()
            .await
            .unwrap();
        assert_eq!(admin.status(), 200);
    }
    env.stop().await;
}

/// The admin listener keeps the error contract too: a monitoring system that probes it with
/// the wrong method gets the same problem document as on the main listener, not an empty body.
#[tokio::test]
async fn admin_listener_answers_errors_as_problems() {
    let env = TestEnv::start().await;
    for method in [reqwest::Method::POST, reqwest::Method::DELETE] {
        for path in ["/metrics", "/livez", "/readyz"] {
            let response = env
                .http
                .request(method.clone(), format!("{}{path}", env.admin_url))
                .send()
                .await
                .unwrap();
            assert_eq!(
                response.headers().get("allow").map(|v| v.to_str().unwrap()),
                Some("GET,HEAD"),
                "{method} {path}"
            );
            expect_problem(response, 405, "METHOD_NOT_ALLOWED").await;
        }
    }
    let unknown = env
        .http
        .get(format!("{}/kyc-sessions", env.admin_url))
        .send()
        .await
        .unwrap();
    expect_problem(unknown, 404, "NOT_FOUND").await;
    env.stop().await;
}

/// A request its client abandoned wrote its `request finished` line with status 499, but the
/// request metrics never counted it: dashboards lost exactly the requests that took too long.
/// It counts with `status="499"` and its caller, like every other.
#[tokio::test]
async fn a_request_its_client_abandons_is_counted_with_status_499() {
    let env = TestEnv::start().await;
    // Its own method, so that no other test of this binary counts under the same labels.
    const ABANDONED: &str = r#"broker_http_requests_total{route="/identities/{clientReference}",method="DELETE",status="499",caller="demo"}"#;
    let counted = |text: &str| {
        text.lines()
            .find_map(|line| line.strip_prefix(ABANDONED))
            .and_then(|value| value.trim().parse::<u64>().ok())
            .unwrap_or(0)
    };
    let before = counted(&env.metrics_text().await);
    common::expect_created(
        env.start_session(json!({"flow": "access", "clientReference": "m-499"}))
            .await,
    )
    .await;
    env.sim.add_fault(FaultRule {
        endpoint: common::PASSWORD_TOKEN.into(),
        latency_ms: Some(2_000),
        count: Some(1),
        ..FaultRule::default()
    });
    let abandoned = tokio::time::timeout(
        std::time::Duration::from_millis(300),
        env.http
            .delete(format!("{}/identities/m-499", env.broker_url))
            .send(),
    )
    .await;
    assert!(abandoned.is_err(), "the request was still waiting");
    let mut text = String::new();
    for _ in 0..250 {
        text = env.metrics_text().await;
        if counted(&text) > before {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert_eq!(counted(&text), before + 1, "{ABANDONED} missing:\n{text}");
    env.stop().await;
}

#[tokio::test]
async fn upstream_failures_are_counted_by_outcome() {
    let env = TestEnv::with(SimConfig::default(), |s| s.resilience.max_attempts = 1).await;
    env.sim.add_fault(FaultRule {
        endpoint: CREATE_PROCESS.into(),
        status: Some(500),
        count: Some(1),
        ..FaultRule::default()
    });
    let response = env
        .start_session(json!({"flow": "standalone", "clientReference": "m-2"}))
        .await;
    expect_problem(response, 502, "UPSTREAM_ERROR").await;
    let text = env.metrics_text().await;
    for expected in [
        r#"broker_finapi_calls_total{service="process_controller",step="create_process",outcome="500",finapi_client="default"}"#,
        r#"broker_kyc_sessions_total{flow="standalone",outcome="UPSTREAM_ERROR"}"#,
    ] {
        assert!(text.contains(expected), "{expected} missing from /metrics");
    }
    env.stop().await;
}

/// Every configuration key with its built-in default, from `config/default.toml`.
fn default_keys() -> BTreeMap<String, String> {
    fn walk(prefix: &str, table: &toml::Table, out: &mut BTreeMap<String, String>) {
        for (name, value) in table {
            let key = if prefix.is_empty() {
                name.clone()
            } else {
                format!("{prefix}.{name}")
            };
            match value {
                toml::Value::Table(t) => walk(&key, t, out),
                other => {
                    out.insert(key, other.to_string());
                }
            }
        }
    }
    let mut out = BTreeMap::new();
    walk("", &DEFAULT_TOML.parse().unwrap(), &mut out);
    out
}

#[test]
fn the_readme_configuration_reference_matches_the_code() {
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    let section = readme
        .split("<!-- config-reference:start -->")
        .nth(1)
        .and_then(|s| s.split("<!-- config-reference:end -->").next())
        .expect("README has the configuration reference markers");
    let mut documented = BTreeMap::new();
    for row in section.lines().filter(|l| l.starts_with("| `")) {
        let cells: Vec<&str> = row.split('|').map(str::trim).collect();
        let key = cells[1].trim_matches('`').to_owned();
        let env = cells[2].trim_matches('`');
        let expected_env = format!(
            "{ENV_PREFIX}{}",
            key.to_ascii_uppercase().replace('.', "__")
        );
        assert_eq!(env, expected_env, "README: wrong variable for {key}");
        documented.insert(key, cells[3].trim_matches('`').to_owned());
    }
    let mut expected = default_keys();
    for optional in [
        "finapi.client_secret",
        "finapi.client_secret_file",
        "finapi.ca_file",
        "identities.password_key",
        "identities.password_key_file",
        "identities.database_url_file",
    ] {
        expected.insert(optional.to_owned(), "–".to_owned());
    }
    assert_eq!(
        documented.keys().collect::<Vec<_>>(),
        expected.keys().collect::<Vec<_>>(),
        "README keys differ from config/default.toml"
    );
    for (key, default) in &expected {
        assert_eq!(&documented[key], default, "README: wrong default for {key}");
    }
}
