//! The broker against a finAPI that is slow, fails, drops connections and goes away: the real
//! broker in front of the real simulator with fault injection. Figures printed by these tests
//! (run with `--nocapture`) are the ones quoted in docs/RELIABILITY.md.

mod common;

use std::collections::BTreeMap;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use common::*;
use giroident_broker::config::Settings;
use giroident_broker::sim::{self, FaultRule, SimConfig};
use serde_json::{Value, json};

/// Sessions per flow in the fault scenario; `RESILIENCE_SESSIONS=2000` for the full count.
fn sessions_per_flow() -> usize {
    std::env::var("RESILIENCE_SESSIONS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(300)
}

const CONCURRENCY: usize = 32;

/// Short backoffs and timeouts, so that the scenarios run in seconds; `Retry-After: 1` is
/// still honoured.
fn fast_retries(s: &mut Settings) {
    s.finapi.request_timeout_ms = 2_000;
    s.resilience.base_backoff_ms = 10;
    s.resilience.max_backoff_ms = 200;
    s.resilience.max_retry_after_ms = 1_000;
    s.resilience.session_budget_ms = 10_000;
}

fn session_body(flow: &str, n: usize) -> Value {
    match flow {
        "standalone" => json!({"flow": "standalone", "clientReference": format!("c-{n}")}),
        _ => json!({"flow": "access"}),
    }
}

/// Outcome of one session: the token, or the problem's status with the session's request id
/// and how long it took.
enum Outcome {
    Token(String),
    Failed {
        status: u16,
        request_id: String,
        elapsed: Duration,
    },
}

/// Runs `n` sessions of `flow`, `CONCURRENCY` at a time, each with its own `X-Request-Id`
/// (`chaos-{flow}-{i}`); checks every failure is a problem+json 502, 503 or 504.
async fn run_sessions(env: &TestEnv, flow: &'static str, n: usize) -> Vec<Outcome> {
    let next = Arc::new(AtomicU64::new(0));
    let mut workers = tokio::task::JoinSet::new();
    for _ in 0..CONCURRENCY {
        let (http, url, next) = (env.http.clone(), env.broker_url.clone(), next.clone());
        workers.spawn(async move {
            let mut outcomes = Vec::new();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed) as usize;
                if i >= n {
                    return outcomes;
                }
                let request_id = format!("chaos-{flow}-{i}");
                let started = Instant::now();
                let response = http
                    .post(format!("{url}/kyc-sessions"))
                    .header("x-request-id", &request_id)
                    .json(&session_body(flow, i))
                    .send()
                    .await
                    .expect("the broker always answers");
                let status = response.status().as_u16();
                let content_type = response.headers().get("content-type").cloned();
                let body: Value = response.json().await.expect("JSON body");
                if status == 201 {
                    outcomes.push(Outcome::Token(
                        body["accessToken"].as_str().unwrap().to_owned(),
                    ));
                } else {
                    assert!(
                        [502, 503, 504].contains(&status),
                        "unexpected {status}: {body}"
                    );
                    assert_eq!(
                        content_type.unwrap().to_str().unwrap(),
                        "application/problem+json"
                    );
                    assert_eq!(body["status"], status, "{body}");
                    outcomes.push(Outcome::Failed {
                        status,
                        request_id,
                        elapsed: started.elapsed(),
                    });
                }
            }
        });
    }
    workers.join_all().await.into_iter().flatten().collect()
}

/// The settings of the fault scenario: [`fast_retries`], but with a call timeout and a budget
/// (the defaults') that no call of a loaded test machine comes near. The scenario injects no
/// latency, so timeouts play no part in what it proves; with 2 s, a call that a busy machine
/// answered late counted as a lost answer, which the simulator's record of the call cannot
/// show, and an exchange's second lost answer failed a session that the test could not explain.
fn chaos_settings(s: &mut Settings) {
    fast_retries(s);
    s.finapi.request_timeout_ms = 10_000;
    s.resilience.session_budget_ms = 30_000;
}

/// Why a session of the fault scenario failed, by the rules of README "Resilience", from the
/// calls finAPI answered under its request id (in order) and how long it took; `None` when the
/// rules should have carried it through. A failed call is a `5xx`, a `429` or a dropped
/// connection (the scenario injects nothing else).
fn failure_reason(
    calls: &[(String, String)],
    elapsed: Duration,
    settings: &Settings,
) -> Option<&'static str> {
    let max_attempts = settings.resilience.max_attempts as usize;
    let failed =
        |outcome: &str| outcome == "dropped" || outcome == "429" || outcome.starts_with('5');
    let (last_endpoint, last_outcome) = calls.last()?;
    if !failed(last_outcome) {
        return None;
    }
    // Each retry needs a whole call timeout and finAPI's `Retry-After` (or a backoff) left in
    // the session's budget.
    let attempt_room = Duration::from_millis(
        settings.finapi.request_timeout_ms + settings.resilience.max_retry_after_ms,
    );
    if elapsed + attempt_room > Duration::from_millis(settings.resilience.session_budget_ms) {
        return Some("the budget could not fit another attempt");
    }
    if last_endpoint == EXCHANGE {
        let exchanges: Vec<&str> = calls
            .iter()
            .filter(|(endpoint, _)| endpoint == EXCHANGE)
            .map(|(_, outcome)| outcome.as_str())
            .collect();
        // A new process at most once after a lost answer.
        if last_outcome == "dropped" && exchanges.iter().filter(|o| **o == "dropped").count() >= 2 {
            return Some("a second exchange answer was lost");
        }
        // At most `max_attempts` processes.
        if exchanges.len() >= max_attempts {
            return Some("the exchange failed with every process");
        }
        return None;
    }
    // A step that may be retried failed `max_attempts` times in a row.
    let in_a_row = calls
        .iter()
        .rev()
        .take_while(|(endpoint, outcome)| endpoint == last_endpoint && failed(outcome))
        .count();
    (in_a_row >= max_attempts).then_some("a step failed on every attempt")
}

/// 5% `500`, 5% `503` with `Retry-After: 1`, 2% dropped connections, on every endpoint.
fn chaos(env: &TestEnv) {
    for rule in [
        FaultRule {
            status: Some(500),
            probability: Some(0.05),
            ..FaultRule::default()
        },
        FaultRule {
            status: Some(503),
            retry_after: Some(1),
            probability: Some(0.05),
            ..FaultRule::default()
        },
        FaultRule {
            drop_connection: true,
            probability: Some(0.02),
            ..FaultRule::default()
        },
    ] {
        env.sim.add_fault(FaultRule {
            endpoint: sim::ANY_ENDPOINT.into(),
            ..rule
        });
    }
}

fn calls_total(stats: &sim::Stats, prefix: &str) -> u64 {
    stats
        .iter()
        .filter(|(k, _)| k.starts_with(prefix))
        .flat_map(|(_, by_status)| by_status.values())
        .sum()
}

/// These tests measure how fast the broker fails and how it behaves under load, so they run
/// one at a time: none of them shares the machine with another test of this file.
async fn one_at_a_time() -> tokio::sync::MutexGuard<'static, ()> {
    static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
    SERIAL.lock().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn most_sessions_succeed_through_faults_on_every_endpoint() {
    let _serial = one_at_a_time().await;
    let n = sessions_per_flow();
    for flow in ["standalone", "access"] {
        let sim = sim::start(SimConfig::default()).await.expect("simulator");
        let mut settings = settings_for(&sim);
        chaos_settings(&mut settings);
        let env = TestEnv::with_settings(sim, &settings).await;
        // Warm the client token before the faults, as a running broker would have it.
        if flow == "access" {
            env.access_session().await;
            env.sim.reset_stats();
        }
        let before = env.resilience();
        chaos(&env);
        let started = Instant::now();
        let outcomes = run_sessions(&env, flow, n).await;
        let elapsed = started.elapsed();
        env.sim.clear_faults();
        let stats = env.sim.stats();
        let after = env.resilience();

        let mut failures: BTreeMap<u16, usize> = BTreeMap::new();
        let mut reasons: BTreeMap<&str, usize> = BTreeMap::new();
        let mut unexplained = Vec::new();
        let mut tokens = Vec::new();
        for outcome in outcomes {
            match outcome {
                Outcome::Token(t) => tokens.push(t),
                Outcome::Failed {
                    status,
                    request_id,
                    elapsed,
                } => {
                    *failures.entry(status).or_default() += 1;
                    let calls = env.sim.calls_of(&request_id);
                    match failure_reason(&calls, elapsed, &settings) {
                        Some(reason) => *reasons.entry(reason).or_default() += 1,
                        None => unexplained.push((request_id, status, elapsed, calls)),
                    }
                }
            }
        }
        let upstream_calls =
            calls_total(&stats, "POST /api/v") + calls_total(&stats, "GET /api/v1");
        println!(
            "scenario 1 flow={flow} sessions={n} successes={} failures={failures:?} reasons={reasons:?} \
             retries={} process_restarts={} processes_possibly_abandoned={} \
             users_found_on_retry={} orphaned_users={} upstream_calls={upstream_calls} \
             calls_per_session={:.2} elapsed_ms={} sim_stats={stats:?}",
            tokens.len(),
            after.retries - before.retries,
            after.process_restarts,
            after.processes_possibly_abandoned,
            after.users_found_on_retry,
            after.orphaned_users,
            upstream_calls as f64 / n as f64,
            elapsed.as_millis(),
        );
        // Every session the rules can carry through the faults succeeds; one that fails, fails
        // for a reason the rules state (a step's attempts used up, a second lost exchange, ...),
        // as the simulator's record of its calls shows. How many fail so depends on the dice:
        // with 11.6 % of calls failing, four in a row come about once in 5,600 calls, a few
        // sessions in 10,000. A fixed 99.5 % of 300 allowed one such failure, and two came
        // now and then.
        assert!(
            unexplained.is_empty(),
            "{flow}: sessions failed that the rules should have carried through: {unexplained:?}"
        );
        // A coarse guard on top, should the faults stop being what this scenario says.
        assert!(
            tokens.len() * 100 >= n * 95,
            "{flow}: only {} of {n} sessions succeeded: {failures:?} {reasons:?}",
            tokens.len()
        );
        // Every token handed out works.
        for token in &tokens {
            assert_eq!(env.sim_user(token).await.status(), 200, "{flow}");
        }
        // No process token was ever exchanged twice. The simulator does not count an exchange
        // of a spent token, it refuses it with 404: that is what would show a second one.
        for (_, count, _) in env.sim.state().process_exchanges() {
            assert!(count <= 1, "a process token was exchanged {count} times");
        }
        assert_eq!(
            env.calls(EXCHANGE, "404"),
            0,
            "{flow}: a spent process token was presented again"
        );
        env.stop().await;
    }
}

#[tokio::test]
async fn a_user_created_by_a_lost_attempt_is_taken_on_entity_exists() {
    let _serial = one_at_a_time().await;
    let env = TestEnv::with(SimConfig::default(), fast_retries).await;
    env.sim.add_fault(FaultRule {
        endpoint: CREATE_USER.into(),
        drop_after_handling: true,
        count: Some(1),
        ..FaultRule::default()
    });
    let session = env.access_session().await;
    assert_eq!(
        env.sim_user(session["accessToken"].as_str().unwrap())
            .await
            .status(),
        200
    );
    assert_eq!(env.calls(CREATE_USER, "422"), 1);
    assert_eq!(env.resilience().users_found_on_retry, 1);
    env.stop().await;
}

#[tokio::test]
async fn a_user_without_a_token_is_a_clean_502_and_counted_as_orphaned() {
    let _serial = one_at_a_time().await;
    let env = TestEnv::with(SimConfig::default(), fast_retries).await;
    env.sim.add_fault(FaultRule {
        endpoint: PASSWORD_TOKEN.into(),
        status: Some(500),
        ..FaultRule::default()
    });
    let problem = expect_problem(
        env.start_session(json!({"flow": "access"})).await,
        502,
        "UPSTREAM_ERROR",
    )
    .await;
    assert!(problem.get("accessToken").is_none() && problem.get("userId").is_none());
    assert_eq!(env.calls(CREATE_USER, "201"), 1);
    assert_eq!(env.resilience().orphaned_users, 1);
    env.stop().await;
}

#[tokio::test]
async fn a_user_whose_request_is_abandoned_during_its_grant_is_deleted_by_the_reaper() {
    let _serial = one_at_a_time().await;
    let env = TestEnv::with(SimConfig::default(), |s| {
        s.server.request_timeout_secs = 2;
        s.identities.reaper_interval_secs = 1;
        s.identities.orphan_min_age_secs = 3;
    })
    .await;
    env.sim.add_fault(FaultRule {
        endpoint: PASSWORD_TOKEN.into(),
        latency_ms: Some(1_000),
        count: Some(1),
        ..FaultRule::default()
    });
    // The client gives up while the broker waits for the password grant (its activation is
    // committed beside it): hyper drops the flow, which hands the identity to the reaper.
    let abandoned = tokio::time::timeout(
        Duration::from_millis(500),
        env.start_session(json!({"flow": "access"})),
    )
    .await;
    assert!(abandoned.is_err(), "the request was still waiting");
    assert_eq!(env.calls(CREATE_USER, "201"), 1);
    // The reaper finds the user and deletes it.
    assert!(
        eventually(Duration::from_secs(15), || env.calls(DELETE_USER, "200")
            == 1)
        .await,
        "the abandoned user was not deleted: {:?}",
        env.sim.stats()
    );
    env.stop().await;
}

#[tokio::test]
async fn a_long_retry_after_is_passed_on_instead_of_waited_out() {
    let _serial = one_at_a_time().await;
    let env = TestEnv::with(SimConfig::default(), fast_retries).await;
    env.sim.add_fault(FaultRule {
        endpoint: CREATE_PROCESS.into(),
        status: Some(503),
        retry_after: Some(30),
        count: Some(1),
        ..FaultRule::default()
    });
    let started = Instant::now();
    let response = env.start_session(session_body("standalone", 1)).await;
    assert_eq!(response.headers()["retry-after"], "30");
    expect_problem(response, 503, "UPSTREAM_UNAVAILABLE").await;
    assert!(started.elapsed() < Duration::from_secs(1));
    assert_eq!(env.all_calls(CREATE_PROCESS), 1);
    env.stop().await;
}

#[tokio::test]
async fn retries_stop_when_the_session_budget_cannot_fit_another_attempt() {
    let _serial = one_at_a_time().await;
    let env = TestEnv::with(SimConfig::default(), |s| {
        fast_retries(s);
        s.finapi.request_timeout_ms = 300;
        s.resilience.session_budget_ms = 1_000;
        s.resilience.max_attempts = 10;
    })
    .await;
    env.sim.add_fault(FaultRule {
        endpoint: CREATE_PROCESS.into(),
        latency_ms: Some(1_000),
        ..FaultRule::default()
    });
    let started = Instant::now();
    let response = env.start_session(session_body("standalone", 1)).await;
    expect_problem(response, 504, "UPSTREAM_TIMEOUT").await;
    let elapsed = started.elapsed();
    // Without the budget, ten attempts of 300 ms would take 3 s.
    assert!(elapsed < Duration::from_millis(1_500), "{elapsed:?}");
    // 300 ms per attempt in a 1 s budget: three attempts at most, never ten.
    let retries = env.resilience().retries;
    assert!((1..=2).contains(&retries), "{retries} retries");
    env.stop().await;
}

/// Requests until the breaker refuses at once; returns how many were needed.
async fn open_the_breaker(env: &TestEnv, flow: &str) -> usize {
    for i in 1..=20 {
        let response = env.start_session(session_body(flow, i)).await;
        assert_eq!(response.status(), 503, "{flow}");
        let s = env.resilience();
        if s.access_breaker_opened + s.process_controller_breaker_opened > 0 {
            return i;
        }
    }
    panic!("the {flow} breaker never opened");
}

#[tokio::test]
async fn the_circuit_opens_when_finapi_is_down_and_closes_when_it_is_back() {
    let _serial = one_at_a_time().await;
    for flow in ["standalone", "access"] {
        let env = TestEnv::with(SimConfig::default(), |s| {
            fast_retries(s);
            s.resilience.breaker_failure_threshold = 5;
            s.resilience.breaker_cooldown_ms = 1_000;
        })
        .await;
        env.sim.add_fault(FaultRule {
            endpoint: sim::ANY_ENDPOINT.into(),
            status: Some(503),
            ..FaultRule::default()
        });
        let needed = open_the_breaker(&env, flow).await;
        let calls_when_open = calls_total(&env.sim.stats(), "");
        let retries_when_open = env.resilience().retries;
        // Printed for docs/RELIABILITY.md, not asserted: timings on a shared machine vary.
        let mut slowest = Duration::ZERO;
        for i in 0..20 {
            let started = Instant::now();
            let response = env.start_session(session_body(flow, i)).await;
            slowest = slowest.max(started.elapsed());
            assert!(
                response.headers()["retry-after"]
                    .to_str()
                    .unwrap()
                    .parse::<u64>()
                    .unwrap()
                    >= 1
            );
            expect_problem(response, 503, "UPSTREAM_UNAVAILABLE").await;
        }
        // At once: no retry and no backoff waited out (a count, not a timing).
        assert_eq!(env.resilience().retries, retries_when_open, "{flow}");
        assert_eq!(
            calls_total(&env.sim.stats(), ""),
            calls_when_open,
            "an open circuit sends nothing to finAPI"
        );
        // finAPI comes back: after the cool-down a probe closes the circuit.
        env.sim.clear_faults();
        let back = Instant::now();
        let mut closed_after = None;
        while back.elapsed() < Duration::from_secs(3) {
            let response = env.start_session(session_body(flow, 0)).await;
            if response.status() == 201 {
                closed_after = Some(back.elapsed());
                break;
            }
            expect_problem(response, 503, "UPSTREAM_UNAVAILABLE").await;
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let closed_after = closed_after.expect("the circuit closes again");
        for i in 0..5 {
            expect_created(env.start_session(session_body(flow, i)).await).await;
        }
        println!(
            "scenario 2 flow={flow} requests_to_open={needed} slowest_open_answer_ms={:.1} \
             closed_after_ms={} stats={:?}",
            slowest.as_secs_f64() * 1e3,
            closed_after.as_millis(),
            env.resilience()
        );
        env.stop().await;
    }
}

#[tokio::test]
async fn a_lost_exchange_answer_starts_a_new_process_once() {
    let _serial = one_at_a_time().await;
    let env = TestEnv::with(SimConfig::default(), fast_retries).await;
    env.sim.add_fault(FaultRule {
        endpoint: EXCHANGE.into(),
        drop_after_handling: true,
        count: Some(1),
        ..FaultRule::default()
    });
    let session = env.standalone_session("c-1").await;
    assert_eq!(
        env.sim_user(session["accessToken"].as_str().unwrap())
            .await
            .status(),
        200
    );
    assert_eq!(env.all_calls(CREATE_PROCESS), 2);
    assert_eq!(env.all_calls(EXCHANGE), 2);
    let exchanges = env.sim.state().process_exchanges();
    assert_eq!(exchanges.len(), 2);
    assert!(exchanges.iter().all(|(_, count, _)| *count == 1));
    assert_eq!(env.resilience().process_restarts, 1);
    println!(
        "scenario 3 one lost answer: sim_stats={:?}",
        env.sim.stats()
    );
    env.stop().await;
}

#[tokio::test]
async fn a_second_lost_exchange_answer_fails_cleanly() {
    let _serial = one_at_a_time().await;
    let env = TestEnv::with(SimConfig::default(), fast_retries).await;
    env.sim.add_fault(FaultRule {
        endpoint: EXCHANGE.into(),
        drop_after_handling: true,
        count: Some(2),
        ..FaultRule::default()
    });
    let response = env.start_session(session_body("standalone", 1)).await;
    expect_problem(response, 502, "UPSTREAM_ERROR").await;
    assert_eq!(env.all_calls(CREATE_PROCESS), 2);
    assert_eq!(env.all_calls(EXCHANGE), 2);
    assert!(
        env.sim
            .state()
            .process_exchanges()
            .iter()
            .all(|(_, count, _)| *count == 1)
    );
    println!(
        "scenario 3 two lost answers: sim_stats={:?}",
        env.sim.stats()
    );
    env.stop().await;
}

/// Eight callers starting access sessions back to back for `period`, each of which must
/// succeed; returns how many ran.
async fn steady_access_load(env: &TestEnv, period: Duration) -> u64 {
    let stop = Arc::new(AtomicBool::new(false));
    let sessions = Arc::new(AtomicU64::new(0));
    let mut workers = tokio::task::JoinSet::new();
    for _ in 0..8 {
        let (http, url) = (env.http.clone(), env.broker_url.clone());
        let (stop, sessions) = (stop.clone(), sessions.clone());
        workers.spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let response = http
                    .post(format!("{url}/kyc-sessions"))
                    .json(&json!({"flow": "access"}))
                    .send()
                    .await
                    .unwrap();
                let status = response.status();
                assert_eq!(status, 201, "{}", response.text().await.unwrap());
                sessions.fetch_add(1, Ordering::Relaxed);
            }
        });
    }
    tokio::time::sleep(period).await;
    stop.store(true, Ordering::Relaxed);
    workers.join_all().await;
    sessions.load(Ordering::Relaxed)
}

/// A broker whose client tokens live `lifetime` and are refreshed 1 s ahead, after one
/// warm-up session.
async fn warm_env_with_short_client_tokens(lifetime: Duration) -> TestEnv {
    let sim = SimConfig {
        client_token_ttl: lifetime,
        ..SimConfig::default()
    };
    let env = TestEnv::with(sim, |s| {
        fast_retries(s);
        s.token_cache.refresh_ahead_secs = 1;
    })
    .await;
    env.access_session().await;
    env
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_background_refresh_keeps_the_token_and_tries_again() {
    let _serial = one_at_a_time().await;
    let lifetime = Duration::from_secs(2);
    let env = warm_env_with_short_client_tokens(lifetime).await;
    env.sim.add_fault(FaultRule {
        endpoint: CLIENT_TOKEN.into(),
        status: Some(503),
        count: Some(3),
        ..FaultRule::default()
    });
    steady_access_load(&env, lifetime + Duration::from_millis(500)).await;
    let s = env.resilience();
    assert_eq!(s.client_token_background_failures, 3, "{s:?}");
    assert_eq!(s.client_token_request_path_fetches, 1, "{s:?}");
    assert!(s.client_tokens_refreshed >= 1, "{s:?}");
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn under_steady_load_client_tokens_are_refreshed_in_the_background() {
    let _serial = one_at_a_time().await;
    let lifetime = Duration::from_secs(2);
    let env = warm_env_with_short_client_tokens(lifetime).await;
    let warm = env.resilience();
    assert_eq!(warm.client_token_request_path_fetches, 1);

    // Three token lifetimes and a bit.
    let sessions = steady_access_load(&env, lifetime * 3 + Duration::from_millis(500)).await;

    let s = env.resilience();
    let client_token_calls = env.all_calls(CLIENT_TOKEN);
    println!(
        "scenario 4 sessions={} client_token_calls={client_token_calls} \
         request_path_fetches_after_warm_up={} background_fetches={} tokens_refreshed={} \
         waits_for_refresh={} create_user_401={} stats={s:?}",
        sessions,
        s.client_token_request_path_fetches - warm.client_token_request_path_fetches,
        s.client_token_background_fetches,
        s.client_tokens_refreshed,
        s.client_token_waits_for_refresh,
        env.calls(CREATE_USER, "401"),
    );
    assert_eq!(
        s.client_token_request_path_fetches, warm.client_token_request_path_fetches,
        "a request fetched a client token itself"
    );
    assert_eq!(client_token_calls, 1 + s.client_token_background_fetches);
    assert!(s.client_tokens_refreshed >= 3, "{s:?}");
    env.stop().await;
}

/// The broker binary, started with `serve` and configured through the environment; returns the
/// child and its address, read from its "broker listening" log line.
fn spawn_broker(
    sim_url: &str,
    drain_secs: u64,
    lines: Option<std::sync::mpsc::Sender<String>>,
) -> (std::process::Child, String) {
    let callers = test_caller("load", r#"["standalone", "access"]"#);
    let drain_secs = drain_secs.to_string();
    let mut command = broker_command_on(&sqlite_ledger(), sim_url);
    command.envs([
        ("GIROIDENT_BROKER_SERVER__DRAIN_SECS", drain_secs.as_str()),
        ("GIROIDENT_BROKER_AUTH__CALLERS", callers.as_str()),
        ("GIROIDENT_BROKER_LIMITS__CALLER_RATE_PER_SEC", "100000"),
        ("GIROIDENT_BROKER_LIMITS__CALLER_BURST", "100000"),
        ("GIROIDENT_BROKER_LIMITS__MAX_IN_FLIGHT", "10000"),
    ]);
    spawn_broker_binary(command, lines)
}

/// During a drain the load balancer probes `/readyz` on every replica, and each `503
/// NOT_READY` was logged at warn as "request failed upstream", though finAPI has no part in
/// it and refusing is what the drain is for: a rolling update filled the logs with false
/// upstream warnings. It is a refusal, at info.
#[tokio::test]
async fn readyz_while_draining_is_logged_as_a_refusal_not_an_upstream_failure() {
    let sim = sim::start(SimConfig::default()).await.unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let (mut child, url) = spawn_broker(&sim.base_url(), 1, Some(tx));
    let http = client_with_key(TEST_API_KEY);
    let killed = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    let mut not_ready = 0;
    while not_ready < 3 {
        let ready = http.get(format!("{url}/readyz")).send().await.unwrap();
        if ready.status() == 503 {
            expect_problem(ready, 503, "NOT_READY").await;
            not_ready += 1;
        }
    }
    let status = tokio::task::spawn_blocking(move || child.wait())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(status.code(), Some(0));
    // The reader thread may still be behind the exited process: read up to its last line.
    let mut lines = Vec::new();
    while let Ok(line) = rx.recv_timeout(Duration::from_secs(10)) {
        let Ok(log) = serde_json::from_str::<Value>(&line) else {
            continue;
        };
        if log["message"] == "broker stopped" {
            break;
        }
        if log["code"] == "NOT_READY" {
            lines.push(log);
        }
    }
    assert_eq!(lines.len(), 3, "{lines:?}");
    for line in &lines {
        assert_eq!(line["level"], "INFO", "{line}");
        assert_eq!(line["message"], "request refused", "{line}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_under_load_drains_without_a_failed_request_and_exits_0() {
    let _serial = one_at_a_time().await;
    let drain = Duration::from_secs(2);
    let sim = sim::start(SimConfig::default()).await.unwrap();
    // Every session takes a while, so that requests are in flight throughout.
    sim.add_fault(FaultRule {
        endpoint: EXCHANGE.into(),
        latency_ms: Some(100),
        ..FaultRule::default()
    });
    let (mut child, url) = spawn_broker(&sim.base_url(), drain.as_secs(), None);
    let http = client_with_key(TEST_API_KEY);

    let sending = Arc::new(AtomicBool::new(true));
    let (ok, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let mut workers = tokio::task::JoinSet::new();
    for w in 0..16 {
        let (http, url, sending) = (http.clone(), url.clone(), sending.clone());
        let (ok, failed) = (ok.clone(), failed.clone());
        workers.spawn(async move {
            let mut i = 0;
            while sending.load(Ordering::Relaxed) {
                i += 1;
                let flow = if (w + i) % 2 == 0 {
                    "standalone"
                } else {
                    "access"
                };
                match http
                    .post(format!("{url}/kyc-sessions"))
                    .json(&session_body(flow, i))
                    .send()
                    .await
                {
                    Ok(r) if r.status() == 201 => ok.fetch_add(1, Ordering::Relaxed),
                    _ => failed.fetch_add(1, Ordering::Relaxed),
                };
            }
        });
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let served_before = ok.load(Ordering::Relaxed);
    let killed = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    let signalled = Instant::now();
    // A load balancer notices /readyz at once...
    let noticed = loop {
        let ready = http.get(format!("{url}/readyz")).send().await.unwrap();
        if ready.status() == 503 {
            break signalled.elapsed();
        }
        assert!(
            signalled.elapsed() < Duration::from_secs(1),
            "/readyz stays 200"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    // ...while traffic keeps coming for half the drain period, and is served.
    tokio::time::sleep(drain / 2).await;
    let served_during_drain = ok.load(Ordering::Relaxed) - served_before;
    // A slow request that is still in flight when the drain period ends.
    sim.add_fault(FaultRule {
        endpoint: CREATE_PROCESS.into(),
        latency_ms: Some(1_500),
        count: Some(1),
        ..FaultRule::default()
    });
    let slow = tokio::spawn(
        http.post(format!("{url}/kyc-sessions"))
            .json(&session_body("standalone", 0))
            .send(),
    );
    sending.store(false, Ordering::Relaxed);
    workers.join_all().await;
    let slow = slow
        .await
        .unwrap()
        .expect("the in-flight request is answered");
    assert_eq!(slow.status(), 201);
    let status = tokio::task::spawn_blocking(move || child.wait())
        .await
        .unwrap()
        .unwrap();
    let exited_after = signalled.elapsed();
    println!(
        "scenario 5 served={} failed={} served_during_drain={served_during_drain} \
         readyz_503_after_ms={} exit={status} exited_after_ms={}",
        ok.load(Ordering::Relaxed) + 1,
        failed.load(Ordering::Relaxed),
        noticed.as_millis(),
        exited_after.as_millis()
    );
    assert_eq!(failed.load(Ordering::Relaxed), 0);
    assert!(served_during_drain > 0);
    assert_eq!(status.code(), Some(0));
    assert!(exited_after >= drain);
    sim.shutdown().await;
}
