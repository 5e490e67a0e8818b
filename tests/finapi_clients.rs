//! Several named finAPI clients (issue 13): each caller uses the clients it is allowed, its
//! first by default; each client has its own token cache, circuit breakers and metric labels,
//! and managed identities are kept, reused and deleted per client.

mod common;

use std::time::Duration;

use common::*;
use giroident_broker::config::Settings;
use giroident_broker::sim::{self, FaultRule, SimClient, SimConfig, SimHandle};
use serde_json::{Value, json};

const LIVE_ID: &str = "live-client";
const LIVE_SECRET: &str = "live-client-secret-3c9e";
const SANDBOX_ID: &str = "sandbox-client";
const SANDBOX_SECRET: &str = "sandbox-client-secret-81fd";
/// User-token lifetimes the simulator gives each client, so that an answer shows which client
/// made its token.
const LIVE_USER_TTL: u64 = 1000;
const SANDBOX_USER_TTL: u64 = 2000;

fn sim_client(id: &str, secret: &str, user_ttl: u64) -> SimClient {
    SimClient {
        user_token_ttl: Some(Duration::from_secs(user_ttl)),
        ..SimClient::new(id, secret)
    }
}

/// One simulator that knows the demo client (`default`), `live` and `sandbox`.
fn one_sim_config() -> SimConfig {
    SimConfig {
        clients: vec![
            SimClient::new(sim::DEMO_CLIENT_ID, sim::DEMO_CLIENT_SECRET),
            sim_client(LIVE_ID, LIVE_SECRET, LIVE_USER_TTL),
            sim_client(SANDBOX_ID, SANDBOX_SECRET, SANDBOX_USER_TTL),
        ],
        ..SimConfig::default()
    }
}

/// The broker's clients: `default` at `sim`, `live` at `live`, `sandbox` at `sandbox`; the
/// test caller may use `live` (its default) and `sandbox`. Each test names them apart
/// (`names`), since the tests of this binary share one metrics registry.
fn two_client_settings(
    sim: &SimHandle,
    live: &SimHandle,
    sandbox: &SimHandle,
    names: [&str; 2],
) -> Settings {
    let mut settings = settings_for(sim);
    add_finapi_client(&mut settings, names[0], live, LIVE_ID, LIVE_SECRET);
    add_finapi_client(&mut settings, names[1], sandbox, SANDBOX_ID, SANDBOX_SECRET);
    settings.auth.callers[0].finapi_clients = Some(names.map(str::to_owned).to_vec());
    settings
}

/// Two simulators that know all three clients: `live`'s and `sandbox`'s hosts.
async fn two_sims() -> (SimHandle, SimHandle) {
    let live = sim::start(one_sim_config())
        .await
        .expect("simulator starts");
    let sandbox = sim::start(one_sim_config())
        .await
        .expect("simulator starts");
    (live, sandbox)
}

/// A broker in front of one simulator that knows all three clients.
async fn one_sim_env() -> TestEnv {
    let sim = sim::start(one_sim_config())
        .await
        .expect("simulator starts");
    let settings = two_client_settings(&sim, &sim, &sim, ["live", "sandbox"]);
    TestEnv::with_settings(sim, &settings).await
}

fn expires_in(session: &Value) -> u64 {
    session["expiresIn"].as_u64().expect("expiresIn")
}

#[tokio::test]
async fn a_caller_runs_with_its_default_client_or_the_one_it_names() {
    let env = one_sim_env().await;

    let by_default = expect_created(env.start_session(json!({"flow": "access"})).await).await;
    assert_eq!(by_default["finapiClient"], "live");
    assert!(
        (LIVE_USER_TTL - 60..=LIVE_USER_TTL).contains(&expires_in(&by_default)),
        "{by_default}"
    );
    let named = expect_created(
        env.start_session(json!({"flow": "access", "finapiClient": "sandbox"}))
            .await,
    )
    .await;
    assert_eq!(named["finapiClient"], "sandbox");
    assert!(
        (SANDBOX_USER_TTL - 60..=SANDBOX_USER_TTL).contains(&expires_in(&named)),
        "{named}"
    );
    let standalone = expect_created(
        env.start_session(
            json!({"flow": "standalone", "clientReference": "c-1", "finapiClient": "sandbox"}),
        )
        .await,
    )
    .await;
    assert_eq!(standalone["finapiClient"], "sandbox");

    // The simulator handed out one client token per client: each has its own cache entry.
    let (client_tokens, _) = env.sim.state().live_tokens();
    assert_eq!(
        client_tokens.len(),
        2,
        "one client token each for live and sandbox"
    );

    let metrics = env.metrics_text().await;
    for expected in [
        r#"broker_finapi_calls_total{service="access",step="client_token",outcome="200",finapi_client="live"} 1"#,
        r#"broker_finapi_calls_total{service="access",step="client_token",outcome="200",finapi_client="sandbox"} 1"#,
        r#"broker_finapi_calls_total{service="process_controller",step="create_process",outcome="201",finapi_client="sandbox"} 1"#,
        r#"broker_finapi_circuit_open{service="access",finapi_client="live"} 0"#,
        r#"broker_finapi_circuit_open{service="process_controller",finapi_client="sandbox"} 0"#,
        r#"broker_finapi_circuit_open{service="access",finapi_client="default"} 0"#,
    ] {
        assert!(
            metrics.contains(expected),
            "{expected} missing from:\n{metrics}"
        );
    }
    assert!(
        !metrics.contains(r#"step="client_token",outcome="200",finapi_client="default""#),
        "the default client was not used: {metrics}"
    );
    env.stop().await;
}

#[tokio::test]
async fn a_client_the_caller_may_not_use_is_403_and_an_unknown_one_is_422() {
    let env = one_sim_env().await;
    let not_allowed = env
        .start_session(json!({"flow": "access", "finapiClient": "default"}))
        .await;
    expect_problem(not_allowed, 403, "FINAPI_CLIENT_NOT_ALLOWED").await;
    let unknown = env
        .start_session(json!({"flow": "access", "finapiClient": "nowhere"}))
        .await;
    let problem = expect_problem(unknown, 422, "INVALID_FIELD").await;
    assert!(
        problem["detail"]
            .as_str()
            .unwrap_or("")
            .contains("finapiClient"),
        "{problem}"
    );
    let not_a_name = env
        .start_session(json!({"flow": "access", "finapiClient": 7}))
        .await;
    expect_problem(not_a_name, 400, "INVALID_BODY").await;

    // The same rules where a user is acted on.
    let identity = format!("{}/identities/cust-1", env.broker_url);
    for (query, status, code) in [
        ("?finapiClient=default", 403, "FINAPI_CLIENT_NOT_ALLOWED"),
        ("?finapiClient=nowhere", 422, "INVALID_FIELD"),
        ("?finapiClient=live&x=1", 422, "INVALID_FIELD"),
    ] {
        let response = env
            .http
            .get(format!("{identity}{query}"))
            .send()
            .await
            .unwrap();
        expect_problem(response, status, code).await;
        let response = env
            .http
            .delete(format!("{}/kyc-sessions/current{query}", env.broker_url))
            .bearer_auth("some-user-token")
            .send()
            .await
            .unwrap();
        expect_problem(response, status, code).await;
    }
    let other_query = env
        .http
        .get(format!("{identity}?finapiClient=live&x=1"))
        .send()
        .await
        .unwrap();
    let problem = expect_problem(other_query, 422, "INVALID_FIELD").await;
    assert_eq!(
        problem["detail"], "finapiClient must be the only query parameter, given once",
        "{problem}"
    );
    // No call reached finAPI for any of them.
    assert_eq!(env.all_calls(CLIENT_TOKEN), 0);
    env.stop().await;
}

#[tokio::test]
async fn a_failing_client_opens_only_its_own_circuit() {
    let (live, sandbox) = two_sims().await;
    let mut settings = two_client_settings(&live, &live, &sandbox, ["cb-live", "cb-sandbox"]);
    settings.resilience.max_attempts = 1;
    settings.resilience.breaker_failure_threshold = 2;
    settings.resilience.breaker_cooldown_ms = 60_000;
    let env = TestEnv::with_settings(live, &settings).await;
    env.sim.add_fault(FaultRule {
        endpoint: CREATE_PROCESS.into(),
        status: Some(503),
        ..FaultRule::default()
    });

    for n in 0..2 {
        let response = env
            .start_session(json!({"flow": "standalone", "clientReference": format!("l-{n}")}))
            .await;
        expect_problem(response, 503, "UPSTREAM_UNAVAILABLE").await;
    }
    let open: Vec<(String, &str, bool)> = env
        .flows
        .circuits_open()
        .into_iter()
        .map(|(client, service, open)| (client.to_string(), service, open))
        .collect();
    assert!(
        open.contains(&("cb-live".into(), "process_controller", true)),
        "{open:?}"
    );
    assert_eq!(
        open.iter().filter(|(_, _, open)| *open).count(),
        1,
        "only live's Process Controller circuit is open: {open:?}"
    );
    // live now fails at once, without calling finAPI; sandbox keeps answering.
    let calls_before = env.all_calls(CREATE_PROCESS);
    let refused = env
        .start_session(json!({"flow": "standalone", "clientReference": "l-3"}))
        .await;
    expect_problem(refused, 503, "UPSTREAM_UNAVAILABLE").await;
    assert_eq!(env.all_calls(CREATE_PROCESS), calls_before);
    for n in 0..3 {
        let session = expect_created(
            env.start_session(json!({
                "flow": "standalone",
                "clientReference": format!("s-{n}"),
                "finapiClient": "cb-sandbox"
            }))
            .await,
        )
        .await;
        assert_eq!(session["finapiClient"], "cb-sandbox");
    }
    let metrics = env.metrics_text().await;
    for expected in [
        r#"broker_finapi_circuit_open{service="process_controller",finapi_client="cb-live"} 1"#,
        r#"broker_finapi_circuit_open{service="process_controller",finapi_client="cb-sandbox"} 0"#,
        r#"broker_finapi_circuit_opened_total{service="process_controller",finapi_client="cb-live"} 1"#,
        r#"broker_finapi_calls_total{service="process_controller",step="create_process",outcome="503",finapi_client="cb-live"} 2"#,
    ] {
        assert!(
            metrics.contains(expected),
            "{expected} missing from:\n{metrics}"
        );
    }
    env.stop().await;
    sandbox.shutdown().await;
}

/// `GET /api/v2/users` at `sim` with `token`: whether the user still exists there.
async fn user_exists_at(sim: &SimHandle, token: &str) -> bool {
    reqwest::Client::new()
        .get(format!("{}/api/v2/users", sim.base_url()))
        .bearer_auth(token)
        .send()
        .await
        .expect("simulator answers")
        .status()
        == 200
}

#[tokio::test]
async fn identities_are_kept_per_client_and_deleted_through_it() {
    let (live, sandbox) = two_sims().await;
    let settings = two_client_settings(&live, &live, &sandbox, ["id-live", "id-sandbox"]);
    let env = TestEnv::with_settings(live, &settings).await;
    let session = |client: Option<&str>| {
        let mut body = json!({"flow": "access", "clientReference": "cust-1"});
        if let Some(client) = client {
            body["finapiClient"] = json!(client);
        }
        env.start_session(body)
    };

    let first = expect_created(session(None).await).await;
    assert_eq!(first["identity"], "created");
    let again = expect_created(session(Some("id-live")).await).await;
    assert_eq!(again["identity"], "reused");
    assert_eq!(again["userId"], first["userId"]);
    // One reference names one identity per client.
    let other = expect_created(session(Some("id-sandbox")).await).await;
    assert_eq!(other["identity"], "created");
    assert_ne!(other["userId"], first["userId"]);
    let other_again = expect_created(session(Some("id-sandbox")).await).await;
    assert_eq!(other_again["identity"], "reused");
    assert_eq!(other_again["userId"], other["userId"]);
    let live_token = again["accessToken"].as_str().unwrap();
    let sandbox_token = other_again["accessToken"].as_str().unwrap();
    assert!(user_exists_at(&env.sim, live_token).await);
    assert!(user_exists_at(&sandbox, sandbox_token).await);

    let identity = format!("{}/identities/cust-1", env.broker_url);
    let shown: Value = env
        .http
        .get(format!("{identity}?finapiClient=id-sandbox"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(shown["userId"], other["userId"]);
    let shown: Value = env
        .http
        .get(&identity)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        shown["userId"], first["userId"],
        "the caller's default client"
    );

    // Deleted through its own client: the sandbox user goes, the live one stays.
    let deleted = env
        .http
        .delete(format!("{identity}?finapiClient=id-sandbox"))
        .send()
        .await
        .unwrap();
    assert_eq!(deleted.status(), 204);
    assert!(!user_exists_at(&sandbox, sandbox_token).await);
    assert!(user_exists_at(&env.sim, live_token).await);
    let deleted = env.http.delete(&identity).send().await.unwrap();
    assert_eq!(deleted.status(), 204);
    assert!(!user_exists_at(&env.sim, live_token).await);

    // A user token is deleted through the client named for it.
    let fresh = expect_created(
        env.start_session(json!({"flow": "access", "finapiClient": "id-sandbox"}))
            .await,
    )
    .await;
    let token = fresh["accessToken"].as_str().unwrap();
    let response = env
        .http
        .delete(format!(
            "{}/kyc-sessions/current?finapiClient=id-sandbox",
            env.broker_url
        ))
        .bearer_auth(token)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 204);
    assert!(!user_exists_at(&sandbox, token).await);
    env.stop().await;
    sandbox.shutdown().await;
}

#[tokio::test]
async fn the_reaper_deletes_each_identity_through_its_client() {
    let (live, sandbox) = two_sims().await;
    let mut settings = two_client_settings(&live, &live, &sandbox, ["r-live", "r-sandbox"]);
    settings.identities.retention_secs = 1;
    settings.identities.reaper_interval_secs = 1;
    let env = TestEnv::with_settings(live, &settings).await;
    let mut tokens = Vec::new();
    for client in ["r-live", "r-sandbox"] {
        let session = expect_created(
            env.start_session(
                json!({"flow": "access", "clientReference": "cust-2", "finapiClient": client}),
            )
            .await,
        )
        .await;
        tokens.push(session["accessToken"].as_str().unwrap().to_owned());
    }
    let (live_token, sandbox_token) = (&tokens[0], &tokens[1]);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while user_exists_at(&env.sim, live_token).await
        || user_exists_at(&sandbox, sandbox_token).await
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the reaper did not delete both users at their own simulators"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for client in ["r-live", "r-sandbox"] {
        let shown: Value = env
            .http
            .get(format!(
                "{}/identities/cust-2?finapiClient={client}",
                env.broker_url
            ))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(shown["state"], "deleted", "{client}: {shown}");
        let first_event = &shown["events"][0];
        assert_eq!(first_event["kind"], "deleted", "{client}: {shown}");
    }
    env.stop().await;
    sandbox.shutdown().await;
}
