//! No secret reaches a log line or a response: every flow and every error path runs with
//! logging at TRACE captured, then every client secret, API key, user password and client
//! token is looked for, and user access tokens are allowed only in `201` bodies.

mod common;

use common::*;
use giroident_broker::config::{CallerSettings, FlowKind, LogFormat};
use giroident_broker::sim::{self, FaultRule, SimClient, SimConfig};
use serde_json::json;

/// Everything the broker answered, as text.
#[derive(Default)]
struct Answers(Vec<(u16, String)>);

impl Answers {
    async fn record(&mut self, response: reqwest::Response) -> (u16, serde_json::Value) {
        let status = response.status().as_u16();
        let headers = format!("{:?}", response.headers());
        let body = response.text().await.unwrap();
        self.0.push((status, format!("{headers}\n{body}")));
        (status, serde_json::from_str(&body).unwrap_or_default())
    }
}

/// What must never leak, gathered as the test goes.
#[derive(Default)]
struct Secrets {
    never: Vec<(&'static str, String)>,
    user_tokens: Vec<String>,
}

impl Secrets {
    fn gather(&mut self, env: &TestEnv) {
        let (client_tokens, user_tokens) = env.sim.state().live_tokens();
        for token in client_tokens {
            self.never.push(("client token", token));
        }
        for password in env.sim.state().user_passwords() {
            self.never.push(("user password", password));
        }
        self.user_tokens.extend(user_tokens);
    }
}

const CLIENT_SECRET: &str = "leak-test-client-secret-7f3a9c";
const OTHER_KEY: &str = "leak-test-other-caller-key-51b2";
/// The secret of a second finAPI client, `sandbox`.
const SANDBOX_SECRET: &str = "leak-test-sandbox-secret-e47b10";

/// Adds the finAPI client `sandbox` (at the same simulator) with `secret`, and lets the test
/// caller use it after `default`.
fn add_sandbox(s: &mut giroident_broker::config::Settings, secret: &str) {
    s.finapi.clients.insert(
        "sandbox".into(),
        giroident_broker::config::FinapiClientSettings {
            client_id: "sandbox-client".into(),
            client_secret: Some(secret.into()),
            client_secret_file: None,
            access_url: s.finapi.access_url.clone(),
            process_controller_url: s.finapi.process_controller_url.clone(),
            process_id: None,
            ca_file: None,
        },
    );
    s.auth.callers[0].finapi_clients = Some(vec!["default".into(), "sandbox".into()]);
}

#[tokio::test]
async fn no_secret_reaches_logs_or_responses() {
    let logs = CapturedLogs::install(LogFormat::Json, "trace");

    let sim_config = SimConfig {
        clients: vec![
            SimClient::new(sim::DEMO_CLIENT_ID, CLIENT_SECRET),
            SimClient::new("sandbox-client", SANDBOX_SECRET),
        ],
        ..SimConfig::default()
    };
    let env = TestEnv::with(sim_config, |s| {
        s.finapi.client_secret = Some(CLIENT_SECRET.into());
        add_sandbox(s, SANDBOX_SECRET);
        s.auth.callers.push(CallerSettings::from_key(
            "other",
            OTHER_KEY.as_bytes(),
            &[FlowKind::Access],
        ));
    })
    .await;
    let mut answers = Answers::default();
    let mut secrets = Secrets::default();

    // Both flows, and deletion.
    let (_, standalone) = answers
        .record(
            env.start_session(json!({"flow": "standalone", "clientReference": "c-1"}))
                .await,
        )
        .await;
    let (_, access) = answers
        .record(
            env.start_session(json!({"flow": "access", "email": "jane@example.com"}))
                .await,
        )
        .await;
    secrets.gather(&env);
    let access_token = access["accessToken"].as_str().unwrap().to_owned();
    answers
        .record(env.delete_current(&access_token).await)
        .await;
    answers
        .record(env.delete_current(&access_token).await)
        .await;
    let standalone_token = standalone["accessToken"].as_str().unwrap();
    answers
        .record(env.delete_current(standalone_token).await)
        .await;

    // Managed identities: created, reused, shown, a deletion finAPI refuses, one it does.
    let reference = "leak-test-raw-reference-9d2c";
    for _ in 0..2 {
        answers
            .record(
                env.start_session(json!({"flow": "access", "clientReference": reference}))
                    .await,
            )
            .await;
    }
    // The same through the second client.
    for body in [
        json!({"flow": "standalone", "clientReference": "c-5", "finapiClient": "sandbox"}),
        json!({"flow": "access", "clientReference": reference, "finapiClient": "sandbox"}),
        json!({"flow": "access", "clientReference": reference, "finapiClient": "sandbox"}),
        json!({"flow": "access", "finapiClient": "nowhere"}),
    ] {
        answers.record(env.start_session(body).await).await;
    }
    secrets.gather(&env);
    answers
        .record(
            env.http
                .delete(format!(
                    "{}/identities/{reference}?finapiClient=sandbox",
                    env.broker_url
                ))
                .send()
                .await
                .unwrap(),
        )
        .await;
    let identity_url = format!("{}/identities/{reference}", env.broker_url);
    for url in [
        identity_url.clone(),
        format!("{identity_url}/"),
        format!("{identity_url}/x"),
        // Unmatched paths naming the identities: a base URL with a trailing slash, the wrong
        // case, an escaped slash.
        format!("{}//identities/{reference}", env.broker_url),
        format!("{}/Identities/{reference}", env.broker_url),
        format!("{}/identities%2F{reference}", env.broker_url),
    ] {
        answers
            .record(env.http.get(&url).send().await.unwrap())
            .await;
    }
    env.sim.add_fault(FaultRule {
        endpoint: "DELETE /api/v2/users".into(),
        status: Some(423),
        count: Some(1),
        ..FaultRule::default()
    });
    for _ in 0..2 {
        answers
            .record(env.http.delete(&identity_url).send().await.unwrap())
            .await;
    }
    secrets.gather(&env);

    // Caller errors.
    let plain = reqwest::Client::new();
    let url = format!("{}/kyc-sessions", env.broker_url);
    for key in [None, Some("wrong-key"), Some(OTHER_KEY)] {
        let mut request = plain
            .post(&url)
            .json(&json!({"flow": "standalone", "clientReference": "c-2"}));
        if let Some(key) = key {
            request = request.header("x-api-key", key);
        }
        answers.record(request.send().await.unwrap()).await;
    }
    // Bad input.
    for body in [
        r#"{"flow":"#,
        r#"{"flow":"access","password":"x"}"#,
        r#"{"flow":"access","email":"bad"}"#,
    ] {
        let request = env
            .http
            .post(&url)
            .header("content-type", "application/json")
            .body(body);
        answers.record(request.send().await.unwrap()).await;
    }
    answers
        .record(
            env.http
                .get(format!("{}/nowhere", env.broker_url))
                .send()
                .await
                .unwrap(),
        )
        .await;

    // Upstream errors: a revoked client token (invalidated and replaced), one refused twice,
    // finAPI unavailable, a dropped connection, a lost exchange answer.
    env.sim.revoke_all_tokens();
    answers
        .record(env.start_session(json!({"flow": "access"})).await)
        .await;
    secrets.gather(&env);
    for rule in [
        FaultRule {
            endpoint: CREATE_USER.into(),
            status: Some(401),
            count: Some(2),
            ..FaultRule::default()
        },
        FaultRule {
            endpoint: CREATE_USER.into(),
            status: Some(503),
            retry_after: Some(1),
            count: Some(1),
            ..FaultRule::default()
        },
        FaultRule {
            endpoint: PASSWORD_TOKEN.into(),
            drop_connection: true,
            count: Some(1),
            ..FaultRule::default()
        },
    ] {
        env.sim.add_fault(rule);
        answers
            .record(env.start_session(json!({"flow": "access"})).await)
            .await;
        secrets.gather(&env);
    }
    env.sim.add_fault(FaultRule {
        endpoint: EXCHANGE.into(),
        drop_after_handling: true,
        count: Some(1),
        ..FaultRule::default()
    });
    answers
        .record(
            env.start_session(json!({"flow": "standalone", "clientReference": "c-3"}))
                .await,
        )
        .await;
    secrets.gather(&env);
    env.stop().await;

    // A broker whose client secret finAPI refuses: that secret must not leak either.
    let wrong_secret = "leak-test-wrong-secret-0d41";
    let wrong_sandbox_secret = "leak-test-wrong-sandbox-secret-77a3";
    let env = TestEnv::with(SimConfig::default(), |s| {
        s.finapi.client_secret = Some(wrong_secret.into());
        add_sandbox(s, wrong_sandbox_secret);
    })
    .await;
    for body in [
        json!({"flow": "access"}),
        json!({"flow": "standalone", "clientReference": "c-4"}),
        json!({"flow": "access", "finapiClient": "sandbox"}),
        json!({"flow": "standalone", "clientReference": "c-6", "finapiClient": "sandbox"}),
    ] {
        let (status, _) = answers.record(env.start_session(body).await).await;
        assert_eq!(status, 502);
    }
    env.stop().await;

    secrets.never.push(("client secret", CLIENT_SECRET.into()));
    secrets.never.push(("client secret", wrong_secret.into()));
    secrets.never.push(("client secret", SANDBOX_SECRET.into()));
    secrets
        .never
        .push(("client secret", wrong_sandbox_secret.into()));
    secrets.never.push(("API key", TEST_API_KEY.into()));
    secrets.never.push(("API key", OTHER_KEY.into()));
    secrets
        .never
        .push(("identity password key", TEST_PASSWORD_KEY.into()));
    secrets.never.push((
        "raw client reference",
        "leak-test-raw-reference-9d2c".into(),
    ));

    let logs = logs.text();
    assert!(
        logs.lines().count() > 50,
        "too few log lines captured: the test would prove nothing"
    );
    assert!(logs.contains("\"level\":\"TRACE\"") || logs.contains("\"level\":\"DEBUG\""));
    // Log lines name the finAPI client they concern (never its secret, checked below).
    assert!(
        logs.contains(r#""finapi_client":"sandbox""#),
        "no log line names the client"
    );
    assert!(secrets.user_tokens.len() >= 2 && secrets.never.len() >= 8);
    for (what, secret) in &secrets.never {
        assert!(!logs.contains(secret.as_str()), "a {what} is in the logs");
        for (status, answer) in &answers.0 {
            assert!(
                !answer.contains(secret.as_str()),
                "a {what} is in a {status} answer"
            );
        }
    }
    for token in &secrets.user_tokens {
        assert!(
            !logs.contains(token.as_str()),
            "a user access token is in the logs"
        );
        for (status, answer) in &answers.0 {
            if answer.contains(token.as_str()) {
                assert_eq!(*status, 201, "a user access token is in a {status} answer");
            }
        }
    }
}
