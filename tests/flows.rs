//! Both GiroIdent flows end to end: the real broker in front of the real simulator.

mod common;

use std::time::Duration;

use common::*;
use giroident_broker::sim::{FaultRule, SimClient, SimConfig};
use serde_json::json;

#[tokio::test]
async fn standalone_flow_returns_a_user_token_that_works() {
    let env = TestEnv::start().await;
    let session = env.standalone_session("customer-4711").await;
    assert_eq!(session["flow"], "standalone");
    assert_eq!(session["tokenType"], "bearer");
    assert!(session["expiresIn"].is_null(), "{session}");
    assert!(session.get("userId").is_none(), "{session}");
    let token = session["accessToken"].as_str().unwrap();
    assert_eq!(env.sim_user(token).await.status(), 200);
    assert_eq!(env.calls(CREATE_PROCESS, "201"), 1);
    assert_eq!(env.calls(EXCHANGE, "200"), 1);
    env.stop().await;
}

#[tokio::test]
async fn access_flow_returns_a_user_token_and_the_user_id() {
    let env = TestEnv::start().await;
    let response = env
        .start_session(
            json!({"flow": "access", "email": "jane@example.com", "phone": "+49 89 1234"}),
        )
        .await;
    let session = expect_created(response).await;
    assert_eq!(session["flow"], "access");
    assert_eq!(session["finapiClient"], "default");
    assert_eq!(session["tokenType"], "bearer");
    assert!(session["expiresIn"].as_u64().unwrap() > 3000, "{session}");
    let token = session["accessToken"].as_str().unwrap();
    let user: serde_json::Value = env.sim_user(token).await.json().await.unwrap();
    assert_eq!(user["id"].as_str(), session["userId"].as_str());
    assert_eq!(user["email"], "jane@example.com");
    assert_eq!(user["phone"], "+49 89 1234");
    // Never the user's password nor any client credential.
    let fields: Vec<&String> = session.as_object().unwrap().keys().collect();
    assert_eq!(
        fields,
        [
            "accessToken",
            "deleteAfter",
            "expiresIn",
            "finapiClient",
            "flow",
            "identity",
            "tokenType",
            "userId"
        ]
    );
    env.stop().await;
}

#[tokio::test]
async fn default_flow_comes_from_config() {
    let env = TestEnv::with(SimConfig::default(), |s| {
        s.flows.default_flow = "access".into()
    })
    .await;
    let session = expect_created(env.start_session(json!({})).await).await;
    assert_eq!(session["flow"], "access");
    env.stop().await;
}

#[tokio::test]
async fn deleting_the_current_user_makes_its_token_useless() {
    let env = TestEnv::start().await;
    let session = env.access_session().await;
    let token = session["accessToken"].as_str().unwrap();
    let response = env.delete_current(token).await;
    assert_eq!(response.status(), 204);
    assert_eq!(env.sim_user(token).await.status(), 401);
    expect_problem(env.delete_current(token).await, 401, "USER_TOKEN_REJECTED").await;
    env.stop().await;
}

#[tokio::test]
async fn deleting_needs_a_bearer_user_token() {
    let env = TestEnv::start().await;
    let response = env
        .http
        .delete(format!("{}/kyc-sessions/current", env.broker_url))
        .send()
        .await
        .unwrap();
    expect_problem(response, 401, "MISSING_USER_TOKEN").await;
    // A client token is not a user token.
    let client_token = env.sim_client_token().await;
    expect_problem(
        env.delete_current(&client_token).await,
        403,
        "NOT_A_USER_TOKEN",
    )
    .await;
    env.stop().await;
}

#[tokio::test]
async fn the_standalone_user_can_be_deleted_too() {
    let env = TestEnv::start().await;
    let session = env.standalone_session("customer-1").await;
    let token = session["accessToken"].as_str().unwrap();
    assert_eq!(env.delete_current(token).await.status(), 204);
    assert_eq!(env.sim_user(token).await.status(), 401);
    env.stop().await;
}

#[tokio::test]
async fn the_process_token_is_exchanged_once_with_invalidate_true() {
    let env = TestEnv::start().await;
    env.standalone_session("customer-1").await;
    assert_eq!(env.all_calls(EXCHANGE), 1);
    let exchanges = env.sim.state().process_exchanges();
    assert_eq!(exchanges.len(), 1);
    let (process_token, count, invalidated) = exchanges[0].clone();
    assert_eq!((count, invalidated), (1, true));
    // The spent process token cannot be exchanged again.
    let again = env
        .http
        .get(format!(
            "{}/api/v1/processes/{process_token}?invalidate=true",
            env.sim.base_url()
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(again.status(), 404);
    env.stop().await;
}

#[tokio::test]
async fn invalidation_can_be_switched_off() {
    let env = TestEnv::with(SimConfig::default(), |s| {
        s.flows.invalidate_process_token = false
    })
    .await;
    env.standalone_session("customer-1").await;
    let exchanges = env.sim.state().process_exchanges();
    assert_eq!((exchanges[0].1, exchanges[0].2), (1, false));
    env.stop().await;
}

#[tokio::test]
async fn concurrent_cold_start_requests_fetch_one_client_token() {
    let env = TestEnv::start().await;
    let mut requests = tokio::task::JoinSet::new();
    for _ in 0..200 {
        let request = env
            .http
            .post(format!("{}/kyc-sessions", env.broker_url))
            .json(&json!({"flow": "access"}));
        requests.spawn(async move { request.send().await.expect("broker answers") });
    }
    for response in requests.join_all().await {
        expect_created(response).await;
    }
    assert_eq!(env.all_calls(CLIENT_TOKEN), 1);
    assert_eq!(env.calls(CREATE_USER, "201"), 200);
    env.stop().await;
}

#[tokio::test]
async fn an_expired_client_token_is_fetched_again() {
    let sim = SimConfig {
        client_token_ttl: Duration::from_secs(2),
        ..SimConfig::default()
    };
    let env = TestEnv::with(sim, |_| {}).await;
    env.access_session().await;
    assert_eq!(env.all_calls(CLIENT_TOKEN), 1);
    tokio::time::sleep(Duration::from_millis(2200)).await;
    env.access_session().await;
    assert_eq!(env.all_calls(CLIENT_TOKEN), 2);
    // The broker never presented the expired token.
    assert_eq!(env.calls(CREATE_USER, "401"), 0);
    env.stop().await;
}

#[tokio::test]
async fn a_revoked_client_token_is_replaced_once() {
    let env = TestEnv::start().await;
    env.access_session().await;
    env.sim.revoke_all_tokens();
    env.access_session().await;
    assert_eq!(env.calls(CREATE_USER, "401"), 1);
    assert_eq!(env.calls(CREATE_USER, "201"), 2);
    assert_eq!(env.all_calls(CLIENT_TOKEN), 2);
    env.stop().await;
}

#[tokio::test]
async fn a_client_token_revoked_while_its_refresh_waits_is_replaced_at_once() {
    // A 20 s token is refreshed from half its life on: a session after 10 s starts the
    // background refresh, which gets the same token back and waits until 19 s to ask again.
    let sim = SimConfig {
        client_token_ttl: Duration::from_secs(20),
        ..SimConfig::default()
    };
    let env = TestEnv::with(sim, |_| {}).await;
    env.access_session().await;
    tokio::time::sleep(Duration::from_millis(10_200)).await;
    env.access_session().await;
    assert!(
        eventually(Duration::from_secs(5), || env.all_calls(CLIENT_TOKEN) == 2).await,
        "the background refresh asked finAPI"
    );
    env.sim.revoke_all_tokens();
    // finAPI refuses the token 9 s before its end: a new one is fetched now, not at 19 s.
    let answer = tokio::time::timeout(
        Duration::from_secs(5),
        env.start_session(json!({"flow": "access"})),
    )
    .await
    .expect("the session does not wait for the refresh");
    expect_created(answer).await;
    assert_eq!(env.calls(CREATE_USER, "401"), 1);
    assert_eq!(env.all_calls(CLIENT_TOKEN), 3);
    env.stop().await;
}

#[tokio::test]
async fn a_second_401_on_a_fresh_client_token_is_an_error() {
    let env = TestEnv::start().await;
    env.access_session().await;
    env.sim.add_fault(FaultRule {
        endpoint: CREATE_USER.into(),
        status: Some(401),
        count: Some(2),
        ..FaultRule::default()
    });
    expect_problem(
        env.start_session(json!({"flow": "access"})).await,
        502,
        "UPSTREAM_REJECTED",
    )
    .await;
    assert_eq!(env.calls(CREATE_USER, "401"), 2);
    assert_eq!(env.all_calls(CLIENT_TOKEN), 2);
    env.stop().await;
}

#[tokio::test]
async fn wrong_client_credentials_are_a_bad_gateway_without_the_secret() {
    let sim = SimConfig {
        clients: vec![SimClient::new("demo-client", "another-secret")],
        ..SimConfig::default()
    };
    let env = TestEnv::with(sim, |_| {}).await;
    for body in [
        json!({"flow": "access"}),
        json!({"flow": "standalone", "clientReference": "c-1"}),
    ] {
        let problem = expect_problem(env.start_session(body).await, 502, "UPSTREAM_REJECTED").await;
        assert!(!problem.to_string().contains("demo-client-secret"));
    }
    env.stop().await;
}

#[tokio::test]
async fn finapi_unavailable_is_a_503_with_retry_after() {
    let env = TestEnv::start().await;
    env.sim.add_fault(FaultRule {
        endpoint: CREATE_PROCESS.into(),
        status: Some(503),
        retry_after: Some(7),
        count: Some(1),
        ..FaultRule::default()
    });
    let response = env
        .start_session(json!({"flow": "standalone", "clientReference": "c-1"}))
        .await;
    assert_eq!(response.headers()["retry-after"], "7");
    expect_problem(response, 503, "UPSTREAM_UNAVAILABLE").await;
    env.stop().await;
}

#[tokio::test]
async fn finapi_errors_map_to_documented_statuses() {
    // One attempt: the mapping of a single failure, without retries (tests/resilience.rs).
    let env = TestEnv::with(SimConfig::default(), |s| s.resilience.max_attempts = 1).await;
    for (status, expected, code) in [
        (500, 502, "UPSTREAM_ERROR"),
        (502, 502, "UPSTREAM_ERROR"),
        (504, 504, "UPSTREAM_TIMEOUT"),
        (429, 503, "UPSTREAM_UNAVAILABLE"),
        (400, 502, "UPSTREAM_REJECTED"),
    ] {
        env.sim.add_fault(FaultRule {
            endpoint: CREATE_USER.into(),
            status: Some(status),
            count: Some(1),
            ..FaultRule::default()
        });
        let response = env.start_session(json!({"flow": "access"})).await;
        expect_problem(response, expected, code).await;
    }
    env.stop().await;
}

#[tokio::test]
async fn a_dropped_connection_is_a_bad_gateway() {
    // One attempt: the mapping of a single failure, without retries (tests/resilience.rs).
    let env = TestEnv::with(SimConfig::default(), |s| s.resilience.max_attempts = 1).await;
    env.sim.add_fault(FaultRule {
        endpoint: PASSWORD_TOKEN.into(),
        drop_connection: true,
        count: Some(1),
        ..FaultRule::default()
    });
    expect_problem(
        env.start_session(json!({"flow": "access"})).await,
        502,
        "UPSTREAM_ERROR",
    )
    .await;
    env.stop().await;
}

#[tokio::test]
async fn a_slow_finapi_call_times_out_with_504() {
    let env = TestEnv::with(SimConfig::default(), |s| {
        s.finapi.request_timeout_ms = 200;
        s.resilience.max_attempts = 1;
    })
    .await;
    env.sim.add_fault(FaultRule {
        endpoint: CREATE_PROCESS.into(),
        latency_ms: Some(1000),
        count: Some(1),
        ..FaultRule::default()
    });
    let response = env
        .start_session(json!({"flow": "standalone", "clientReference": "c-1"}))
        .await;
    expect_problem(response, 504, "UPSTREAM_TIMEOUT").await;
    env.stop().await;
}

#[tokio::test]
async fn an_unreachable_finapi_is_a_503() {
    let sim = giroident_broker::sim::start(SimConfig::default())
        .await
        .unwrap();
    let mut settings = settings_for(&sim);
    // A port nothing listens on: bind one, then close it.
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    settings.finapi.process_controller_url = format!("http://{closed}");
    let env = TestEnv::with_settings(sim, &settings).await;
    let response = env
        .start_session(json!({"flow": "standalone", "clientReference": "c-1"}))
        .await;
    expect_problem(response, 503, "UPSTREAM_UNAVAILABLE").await;
    env.stop().await;
}

#[tokio::test]
async fn the_request_id_is_echoed_and_passed_to_finapi() {
    let env = TestEnv::start().await;
    let response = env
        .http
        .post(format!("{}/kyc-sessions", env.broker_url))
        .header("x-request-id", "gateway-abc-123")
        .json(&json!({"flow": "access"}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.headers()["x-request-id"], "gateway-abc-123");
    assert!(
        env.sim
            .state()
            .seen_request_ids()
            .iter()
            .any(|id| id == "gateway-abc-123"),
        "finAPI never saw the request id"
    );
    // An unsafe id is replaced, not echoed.
    let response = env
        .http
        .get(format!("{}/livez", env.broker_url))
        .header("x-request-id", "bad id with spaces")
        .send()
        .await
        .unwrap();
    assert_ne!(response.headers()["x-request-id"], "bad id with spaces");
    env.stop().await;
}
