//! finAPI's end-user metadata headers (`PSU-IP-Address`, `PSU-Device-OS`, `PSU-User-Agent`):
//! validated by the broker, passed to the finAPI calls made for the end user, never to
//! client-token calls, and the IP address never logged. Observed at the real simulator.

mod common;

use common::*;
use giroident_broker::config::LogFormat;
use giroident_broker::sim::{FaultRule, PsuRecord, SimConfig};
use serde_json::{Value, json};

const IP: &str = "203.0.113.7";
const OS: &str = "Android 14";
const UA: &str = "Mozilla/5.0 (Linux; Android 14) Mobile Safari/537.36";

/// A request to the broker with a request id and the given `PSU-*` headers.
fn with_psu(
    request: reqwest::RequestBuilder,
    request_id: &str,
    headers: &[(&str, &str)],
) -> reqwest::RequestBuilder {
    headers.iter().fold(
        request.header("x-request-id", request_id),
        |request, (name, value)| request.header(*name, *value),
    )
}

fn all_three(ip: &'static str) -> [(&'static str, &'static str); 3] {
    [
        ("PSU-IP-Address", ip),
        ("PSU-Device-OS", OS),
        ("PSU-User-Agent", UA),
    ]
}

async fn start(env: &TestEnv, request_id: &str, body: Value, headers: &[(&str, &str)]) -> Value {
    let request = env
        .http
        .post(format!("{}/kyc-sessions", env.broker_url))
        .json(&body);
    expect_created(with_psu(request, request_id, headers).send().await.unwrap()).await
}

async fn delete(
    env: &TestEnv,
    request_id: &str,
    token: &str,
    headers: &[(&str, &str)],
) -> reqwest::Response {
    let request = env
        .http
        .delete(format!("{}/kyc-sessions/current", env.broker_url))
        .bearer_auth(token);
    with_psu(request, request_id, headers).send().await.unwrap()
}

/// The records the simulator kept for `endpoint` with this request id.
fn records(env: &TestEnv, endpoint: &str, request_id: &str) -> Vec<PsuRecord> {
    env.sim
        .psu_headers()
        .remove(endpoint)
        .unwrap_or_default()
        .into_iter()
        .filter(|record| record.request_id == request_id)
        .collect()
}

fn expect_all_three(env: &TestEnv, endpoint: &str, request_id: &str, ip: &str) {
    let seen = records(env, endpoint, request_id);
    assert!(!seen.is_empty(), "no {endpoint} call for {request_id}");
    for record in seen {
        assert_eq!(record.ip_address.as_deref(), Some(ip), "{endpoint}");
        assert_eq!(record.device_os.as_deref(), Some(OS), "{endpoint}");
        assert_eq!(record.user_agent.as_deref(), Some(UA), "{endpoint}");
    }
}

fn expect_none(record: &PsuRecord, what: &str) {
    assert_eq!(
        (&record.ip_address, &record.device_os, &record.user_agent),
        (&None, &None, &None),
        "{what}"
    );
}

#[tokio::test]
async fn access_flow_and_deletion_pass_the_headers_on_but_the_client_token_call_does_not() {
    let env = TestEnv::start().await;
    // The first session fetches the client token inside the request that carries the headers.
    let session = start(
        &env,
        "psu-access",
        json!({"flow": "access"}),
        &all_three(IP),
    )
    .await;
    expect_all_three(&env, CREATE_USER, "psu-access", IP);
    expect_all_three(&env, PASSWORD_TOKEN, "psu-access", IP);
    let client_token_calls = env.sim.psu_headers().remove(CLIENT_TOKEN).unwrap();
    assert!(!client_token_calls.is_empty());
    for record in &client_token_calls {
        expect_none(record, "client_credentials call");
    }

    let token = session["accessToken"].as_str().unwrap();
    let response = delete(&env, "psu-delete", token, &all_three("198.51.100.20")).await;
    assert_eq!(response.status(), 204);
    expect_all_three(&env, DELETE_USER, "psu-delete", "198.51.100.20");
    env.stop().await;
}

#[tokio::test]
async fn standalone_flow_passes_the_headers_to_process_creation_and_exchange() {
    let env = TestEnv::start().await;
    let body = json!({"flow": "standalone", "clientReference": "psu-1"});
    start(&env, "psu-standalone", body, &all_three(IP)).await;
    expect_all_three(&env, CREATE_PROCESS, "psu-standalone", IP);
    expect_all_three(&env, EXCHANGE, "psu-standalone", IP);
    env.stop().await;
}

#[tokio::test]
async fn headers_are_optional_and_only_those_given_are_sent() {
    let env = TestEnv::start().await;
    start(&env, "psu-none", json!({"flow": "access"}), &[]).await;
    for endpoint in [CREATE_USER, PASSWORD_TOKEN] {
        let seen = records(&env, endpoint, "psu-none");
        assert_eq!(seen.len(), 1, "{endpoint}");
        expect_none(&seen[0], endpoint);
    }
    let headers = [("PSU-Device-OS", OS)];
    start(&env, "psu-os", json!({"flow": "access"}), &headers).await;
    let seen = records(&env, CREATE_USER, "psu-os");
    assert_eq!(seen[0].device_os.as_deref(), Some(OS));
    assert_eq!((&seen[0].ip_address, &seen[0].user_agent), (&None, &None));
    env.stop().await;
}

#[tokio::test]
async fn invalid_headers_are_refused_with_422_before_any_finapi_call() {
    let env = TestEnv::start().await;
    let long_os = "x".repeat(129);
    let long_ua = "y".repeat(513);
    let cases: Vec<(&str, &str)> = vec![
        ("PSU-IP-Address", "2001:db8::1"),
        ("PSU-IP-Address", "::ffff:203.0.113.7"),
        ("PSU-IP-Address", "203.0.113.256"),
        ("PSU-IP-Address", "203.0.113.7, 10.0.0.1"),
        ("PSU-IP-Address", "localhost"),
        ("PSU-IP-Address", ""),
        ("PSU-Device-OS", &long_os),
        ("PSU-Device-OS", ""),
        ("PSU-User-Agent", &long_ua),
        ("PSU-User-Agent", "tab\tinside"),
    ];
    let url = format!("{}/kyc-sessions", env.broker_url);
    for (name, value) in &cases {
        let request = env
            .http
            .post(&url)
            .header(*name, *value)
            .json(&json!({"flow": "access"}));
        let problem = expect_problem(request.send().await.unwrap(), 422, "INVALID_HEADER").await;
        let detail = problem["detail"].as_str().unwrap();
        assert!(detail.starts_with(name), "{name}: {detail}");
        if *name == "PSU-IP-Address" && !value.is_empty() {
            assert!(!detail.contains(value), "{detail}");
        }
    }
    // Not visible ASCII, and a header given twice.
    let umlaut = reqwest::header::HeaderValue::from_bytes("Ümlaut OS".as_bytes()).unwrap();
    let request = env
        .http
        .post(&url)
        .header("PSU-Device-OS", umlaut)
        .json(&json!({"flow": "access"}));
    expect_problem(request.send().await.unwrap(), 422, "INVALID_HEADER").await;
    let request = env
        .http
        .post(&url)
        .header("PSU-IP-Address", IP)
        .header("PSU-IP-Address", "198.51.100.1")
        .json(&json!({"flow": "access"}));
    expect_problem(request.send().await.unwrap(), 422, "INVALID_HEADER").await;

    // Deletion checks them before it calls finAPI, too.
    let response = delete(
        &env,
        "psu-bad-delete",
        "some-user-token",
        &[("PSU-IP-Address", "2001:db8::1")],
    )
    .await;
    expect_problem(response, 422, "INVALID_HEADER").await;

    assert!(env.sim.stats().is_empty(), "{:?}", env.sim.stats());
    env.stop().await;
}

#[tokio::test]
async fn the_end_user_ip_never_reaches_the_logs() {
    let logs = CapturedLogs::install(LogFormat::Json, "trace");
    let env = TestEnv::with(SimConfig::default(), |_| {}).await;
    let ips = [
        "192.0.2.101",
        "192.0.2.102",
        "192.0.2.103",
        "192.0.2.104",
        "2001:db8::105",
    ];
    let session = start(
        &env,
        "leak-access",
        json!({"flow": "access"}),
        &[("PSU-IP-Address", ips[0])],
    )
    .await;
    let body = json!({"flow": "standalone", "clientReference": "leak-1"});
    start(&env, "leak-standalone", body, &[("PSU-IP-Address", ips[1])]).await;
    let token = session["accessToken"].as_str().unwrap();
    let response = delete(&env, "leak-delete", token, &[("PSU-IP-Address", ips[2])]).await;
    assert_eq!(response.status(), 204);
    // A failing flow logs its error with the cause chain.
    env.sim.add_fault(FaultRule {
        endpoint: CREATE_USER.into(),
        status: Some(500),
        ..FaultRule::default()
    });
    let request = env
        .http
        .post(format!("{}/kyc-sessions", env.broker_url))
        .header("PSU-IP-Address", ips[3])
        .json(&json!({"flow": "access"}));
    expect_problem(request.send().await.unwrap(), 502, "UPSTREAM_ERROR").await;
    // A refused one logs the refusal.
    let request = env
        .http
        .post(format!("{}/kyc-sessions", env.broker_url))
        .header("PSU-IP-Address", ips[4])
        .json(&json!({"flow": "access"}));
    expect_problem(request.send().await.unwrap(), 422, "INVALID_HEADER").await;
    env.stop().await;

    let text = logs.text();
    assert!(text.contains("request finished"), "nothing captured");
    assert!(
        text.contains("INVALID_HEADER"),
        "the refusal was not logged"
    );
    for ip in ips {
        assert!(!text.contains(ip), "{ip} found in the logs");
    }
}

#[tokio::test]
async fn the_simulator_shows_the_last_calls_headers_per_endpoint_and_forgets_them() {
    let env = TestEnv::start().await;
    let sim = env.sim.base_url();
    let http = reqwest::Client::new();
    let calls = giroident_broker::sim::PSU_LOG_PER_ENDPOINT + 6;
    for i in 0..calls {
        http.post(format!("{sim}/api/v2/oauth/token"))
            .header("x-request-id", format!("sim-{i}"))
            .header("PSU-IP-Address", IP)
            .header("PSU-User-Agent", UA)
            .form(&[("grant_type", "client_credentials")])
            .send()
            .await
            .unwrap();
    }
    let shown: Value = http
        .get(format!("{sim}/__sim/psu"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    // Without client credentials the grant is refused, and still its headers are kept.
    let kept = shown[CLIENT_TOKEN].as_array().unwrap();
    assert_eq!(kept.len(), giroident_broker::sim::PSU_LOG_PER_ENDPOINT);
    assert_eq!(
        kept.last().unwrap(),
        &json!({"requestId": format!("sim-{}", calls - 1), "ipAddress": IP,
                "deviceOs": null, "userAgent": UA})
    );
    assert_eq!(kept[0]["requestId"], "sim-6");
    let reset = http
        .delete(format!("{sim}/__sim/psu"))
        .send()
        .await
        .unwrap();
    assert_eq!(reset.status(), 204);
    assert!(env.sim.psu_headers().is_empty());
    env.stop().await;
}
