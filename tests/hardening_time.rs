//! Durations finAPI sends (`expires_in`, `Retry-After`) never panic the broker, and a request
//! that meets a client token's end waits for about one upstream call, not for a refresh that
//! finAPI told to come back later. The real broker in front of the real simulator.

mod common;

use std::time::Duration;

use common::*;
use giroident_broker::sim::{FaultRule, SimConfig};
use serde_json::json;
use tokio::time::Instant;

/// Far below the 25 s session budget a request used to wait out; well above one call to the
/// local simulator. A correctness bound, not a performance figure.
const ABOUT_ONE_CALL: Duration = Duration::from_secs(12);

/// These tests schedule requests around a token's end: they run one at a time.
async fn one_at_a_time() -> tokio::sync::MutexGuard<'static, ()> {
    static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
    SERIAL.lock().await
}

/// A broker with default settings (25 s session budget, refresh half-way for short tokens) in
/// front of a simulator handing out client tokens valid `lifetime`, after one warm-up session;
/// returns it and when the warm-up answer arrived (the token ends `lifetime` after at most).
async fn warm_env(lifetime: Duration) -> (TestEnv, Instant) {
    let sim = SimConfig {
        client_token_ttl: lifetime,
        ..SimConfig::default()
    };
    let env = TestEnv::with(sim, |_| {}).await;
    env.access_session().await;
    (env, Instant::now())
}

/// Half-way through the token's life (it arrived at `warmed`) a request starts the background
/// refresh, which finAPI refuses with `429` and `Retry-After: retry_after_secs`.
async fn refuse_the_refresh(
    env: &TestEnv,
    warmed: Instant,
    lifetime: Duration,
    retry_after_secs: u64,
) {
    env.sim.add_fault(FaultRule {
        endpoint: CLIENT_TOKEN.into(),
        status: Some(429),
        retry_after: Some(retry_after_secs),
        count: Some(1),
        ..FaultRule::default()
    });
    tokio::time::sleep_until(warmed + lifetime / 2 + Duration::from_millis(100)).await;
    env.access_session().await;
    assert!(
        eventually(Duration::from_secs(5), || env.calls(CLIENT_TOKEN, "429")
            == 1)
        .await
    );
}

/// `n` access sessions at once; asserts each answers within [`ABOUT_ONE_CALL`], with `201`, or
/// `503 UPSTREAM_UNAVAILABLE` with `Retry-After`; returns how many were `201`.
async fn burst_answers_within_about_one_call(env: &TestEnv, n: usize) -> usize {
    let mut requests = tokio::task::JoinSet::new();
    for _ in 0..n {
        let (http, url) = (env.http.clone(), env.broker_url.clone());
        requests.spawn(async move {
            let sent = Instant::now();
            let response = http
                .post(format!("{url}/kyc-sessions"))
                .json(&json!({"flow": "access"}))
                .send()
                .await
                .expect("the broker answers");
            (sent.elapsed(), response)
        });
    }
    let mut created = 0;
    for (elapsed, response) in requests.join_all().await {
        let status = response.status().as_u16();
        let retry_after = response.headers().get("retry-after").cloned();
        let text = response.text().await.unwrap();
        assert!(
            elapsed < ABOUT_ONE_CALL,
            "answered {status} after {elapsed:?}: {text}"
        );
        match status {
            201 => created += 1,
            503 => assert!(retry_after.is_some(), "503 without Retry-After: {text}"),
            _ => panic!("unexpected {status} after {elapsed:?}: {text}"),
        }
    }
    created
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_after_the_token_end_does_not_wait_out_a_refused_refresh() {
    let _serial = one_at_a_time().await;
    let lifetime = Duration::from_secs(6);
    let (env, warmed) = warm_env(lifetime).await;
    refuse_the_refresh(&env, warmed, lifetime, 30).await;

    // Just after the token's end, and later within the grace period.
    tokio::time::sleep_until(warmed + lifetime + Duration::from_millis(300)).await;
    let created = burst_answers_within_about_one_call(&env, 8).await;
    tokio::time::sleep_until(warmed + lifetime + Duration::from_millis(1500)).await;
    let created_later = burst_answers_within_about_one_call(&env, 8).await;
    println!(
        "created {created}+{created_later} of 16; {:?}; sim {:?}",
        env.resilience(),
        env.sim.stats()
    );
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refresh_told_to_retry_after_u64_max_seconds_panics_nothing_and_refreshes_resume() {
    let _serial = one_at_a_time().await;
    let lifetime = Duration::from_secs(4);
    let (env, warmed) = warm_env(lifetime).await;
    refuse_the_refresh(&env, warmed, lifetime, u64::MAX).await;

    tokio::time::sleep_until(warmed + lifetime + Duration::from_millis(300)).await;
    assert_eq!(burst_answers_within_about_one_call(&env, 4).await, 4);

    // The next token is refreshed in the background again: the failed refresh left nothing
    // behind that claims it still runs.
    let next_end = Instant::now() + lifetime;
    while Instant::now() < next_end + Duration::from_millis(1500) {
        assert_eq!(burst_answers_within_about_one_call(&env, 2).await, 2);
    }
    let s = env.resilience();
    assert!(s.client_tokens_refreshed >= 1, "{s:?}");
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_after_of_u64_max_seconds_on_a_request_is_a_quick_503_capped_at_60_s() {
    let _serial = one_at_a_time().await;
    let env = TestEnv::start().await;
    for endpoint in [CLIENT_TOKEN, CREATE_USER] {
        env.sim.add_fault(FaultRule {
            endpoint: endpoint.into(),
            status: Some(429),
            retry_after: Some(u64::MAX),
            count: Some(1),
            ..FaultRule::default()
        });
        let response = env.start_session(json!({"flow": "access"})).await;
        assert_eq!(response.headers()["retry-after"], "60", "{endpoint}");
        expect_problem(response, 503, "UPSTREAM_UNAVAILABLE").await;
    }
    env.access_session().await;
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_absurd_expires_in_is_read_as_a_year_and_one_client_token_serves_every_session() {
    let _serial = one_at_a_time().await;
    let env = TestEnv::start().await;
    let absurd = |endpoint: &str, expires_in: u64| {
        let mut set = serde_json::Map::new();
        set.insert("expires_in".into(), json!(expires_in));
        FaultRule {
            endpoint: endpoint.into(),
            set: Some(set),
            ..FaultRule::default()
        }
    };
    env.sim.add_fault(absurd(CLIENT_TOKEN, i64::MAX as u64));
    env.access_session().await;
    let mut sessions = tokio::task::JoinSet::new();
    for _ in 0..16 {
        let (http, url) = (env.http.clone(), env.broker_url.clone());
        sessions.spawn(async move {
            let response = http
                .post(format!("{url}/kyc-sessions"))
                .json(&json!({"flow": "access"}))
                .send()
                .await
                .expect("the broker answers");
            expect_created(response).await
        });
    }
    sessions.join_all().await;
    assert_eq!(env.all_calls(CLIENT_TOKEN), 1, "{:?}", env.sim.stats());
    assert_eq!(env.resilience().client_token_request_path_fetches, 1);

    // A user token finAPI says lives longer than a year is passed on as living a year.
    env.sim.add_fault(absurd(PASSWORD_TOKEN, u64::MAX));
    let body = env.access_session().await;
    assert_eq!(body["expiresIn"], 31_536_000, "{body}");
    env.stop().await;
}
