//! Reserved intents (issue 12): intents written ahead in one group commit and taken by access
//! sessions without a `clientReference`. The real broker, the real simulator and a real ledger
//! (SQLite; PostgreSQL where noted); a crash test kills the broker binary with SIGKILL.

mod common;

use std::time::{Duration, Instant};

use common::{CREATE_USER, DELETE_USER, PASSWORD_TOKEN, TEST_API_KEY, TestEnv, pg};
use giroident_broker::config::Settings;
use giroident_broker::demo::Ledger;
use giroident_broker::flows::identities::now_millis;
use giroident_broker::identities::{IdentityState, IdentityStore, Millis};
use giroident_broker::sim::{self, SimConfig};
use serde_json::{Value, json};

/// Short timeouts and a reaper every second; reserved intents are used while younger than
/// (10 s − 2 s) / 2 = 4 s, and the reaper may touch them from 10 s on.
fn quick(s: &mut Settings) {
    common::quick_ledger(s, 10);
}

async fn env_on(ledger: &Ledger, tweak: impl FnOnce(&mut Settings)) -> TestEnv {
    let sim = sim::start(SimConfig::default()).await.expect("simulator");
    let mut settings = common::settings_with_ledger(&sim, ledger);
    quick(&mut settings);
    tweak(&mut settings);
    TestEnv::with_settings(sim, &settings).await
}

use common::ledger_store as store;

/// Records per state, the four states in life-cycle order.
async fn counts(store: &IdentityStore) -> [u64; 4] {
    let counts = store.counts_by_state().await.expect("counts");
    [0, 1, 2, 3].map(|i| counts[i].1)
}

/// The `created_at` of the record of the session's user.
async fn created_at(store: &IdentityStore, session: &Value) -> Millis {
    store
        .find_by_finapi_user(session["userId"].as_str().expect("a user id"))
        .await
        .expect("find")
        .expect("recorded")
        .created_at
}

/// Two sessions in a row without a reference: the second finds the pool empty soon after the
/// first and asks for a refill; returns once an entry is ready.
async fn warm_up(env: &TestEnv) {
    env.access_session().await;
    env.access_session().await;
    let ready = common::eventually(Duration::from_secs(5), || {
        env.flows.reserved_intents_ready() > 0
    })
    .await;
    assert!(ready, "no intent was written ahead");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_without_a_reference_take_intents_written_ahead_on_sqlite() {
    sessions_take_intents_written_ahead(&common::sqlite_ledger()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_without_a_reference_take_intents_written_ahead_on_postgresql() {
    let db = pg::database().await;
    sessions_take_intents_written_ahead(&common::ledger_at(&db.url())).await;
}

async fn sessions_take_intents_written_ahead(ledger: &Ledger) {
    let env = env_on(ledger, |_| {}).await;
    let store = store(ledger).await;
    warm_up(&env).await;
    // The next session's intent was committed before it started.
    let before = now_millis();
    let session = env.access_session().await;
    assert!(created_at(&store, &session).await < before, "{session}");
    assert_eq!(env.flows.reserved_intent_counts().taken, 1);

    // A burst, in waves of 16 concurrent sessions: the pool grows and serves most of them.
    let mut users = std::collections::HashSet::new();
    for _ in 0..6 {
        let wave = (0..16).map(|_| env.start_session(json!({"flow": "access"})));
        for answer in futures_util::future::join_all(wave).await {
            let body = common::expect_created(answer).await;
            assert_eq!(body["identity"], "created");
            assert!(users.insert(body["userId"].as_str().unwrap().to_owned()));
        }
    }
    let counts_now = env.flows.reserved_intent_counts();
    assert!(
        counts_now.taken > 16,
        "the burst took few reserved intents: {counts_now:?}"
    );
    for user in &users {
        let record = store
            .find_by_finapi_user(user)
            .await
            .expect("find")
            .expect("recorded");
        assert_eq!(record.state, IdentityState::Active);
        assert!(record.reference_digest.is_none());
        assert_eq!(record.caller, "demo");
    }
    let sessions = 3 + users.len() as u64;
    assert_eq!(env.all_calls(CREATE_USER), sessions);
    // Every intent not yet taken is one of the pool's (or of a refill still in flight).
    let [intents, active, _, _] = counts(&store).await;
    assert_eq!(active, sessions);
    assert!(
        intents <= counts_now.reserved - counts_now.taken,
        "{intents} {counts_now:?}"
    );
    let metrics = env.metrics_text().await;
    assert!(
        metrics.contains("broker_reserved_intents_total{outcome=\"taken\"}"),
        "{metrics}"
    );
    let sim = env.stop_broker_keep_sim().await;

    // Graceful shutdown: the entries not taken left the ledger; finAPI heard nothing of them.
    assert_eq!(counts(&store).await, [0, sessions, 0, 0]);
    assert_eq!(sim.state().user_passwords().len() as u64, sessions);
    store.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_shutdown_deletes_the_reserved_intents_from_the_ledger() {
    let ledger = common::sqlite_ledger();
    let env = env_on(&ledger, |_| {}).await;
    warm_up(&env).await;
    let store = store(&ledger).await;
    let ready = env.flows.reserved_intents_ready() as u64;
    assert_eq!(counts(&store).await, [ready, 2, 0, 0]);
    let flows = env.flows.clone();
    let sim = env.stop_broker_keep_sim().await;
    assert_eq!(counts(&store).await, [0, 2, 0, 0]);
    assert_eq!(flows.reserved_intent_counts().discarded, ready);
    // Deleted by the broker, which knows it never sent their POST: no finAPI call.
    let stats = sim.stats();
    assert!(!stats.contains_key(DELETE_USER), "{stats:?}");
    assert_eq!(
        stats.get(PASSWORD_TOKEN).map(|s| s.values().sum::<u64>()),
        Some(2),
        "one login per created session, none for the reserved: {stats:?}"
    );
    store.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reserved_intent_past_its_age_bound_is_not_used_but_deleted() {
    let ledger = common::sqlite_ledger();
    // Used while younger than (3 s − 1 s) / 2 = 1 s; the reaper may touch it from 3 s on.
    let env = env_on(&ledger, |s| {
        s.server.request_timeout_secs = 1;
        s.resilience.session_budget_ms = 1_000;
        s.identities.orphan_min_age_secs = 3;
    })
    .await;
    let store = store(&ledger).await;
    let started = Instant::now();
    warm_up(&env).await;
    let ready = env.flows.reserved_intents_ready() as u64;
    // The sweep (every half bound) discards it once older than the bound, before the reaper's
    // orphan age.
    let discarded = common::eventually(Duration::from_secs(5), || {
        env.flows.reserved_intent_counts().discarded == ready
    })
    .await;
    assert!(discarded, "{:?}", env.flows.reserved_intent_counts());
    assert!(started.elapsed() >= Duration::from_secs(1));
    assert_eq!(counts(&store).await, [0, 2, 0, 0]);
    let before = now_millis();
    let session = env.access_session().await;
    assert!(created_at(&store, &session).await >= before, "{session}");
    assert_eq!(env.flows.reserved_intent_counts().taken, 0);
    assert_eq!(env.calls(PASSWORD_TOKEN, "400"), 0, "{:?}", env.sim.stats());
    env.stop().await;
    store.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reserved_intents_zero_writes_every_intent_in_its_session() {
    let ledger = common::sqlite_ledger();
    let env = env_on(&ledger, |s| s.identities.reserved_intents = 0).await;
    let store = store(&ledger).await;
    for _ in 0..3 {
        let before = now_millis();
        let session = env.access_session().await;
        assert!(created_at(&store, &session).await >= before, "{session}");
    }
    let burst = (0..16).map(|_| env.start_session(json!({"flow": "access"})));
    for answer in futures_util::future::join_all(burst).await {
        common::expect_created(answer).await;
    }
    assert_eq!(env.flows.reserved_intents_ready(), 0);
    assert_eq!(env.flows.reserved_intent_counts(), Default::default());
    assert_eq!(counts(&store).await, [0, 19, 0, 0]);
    env.stop().await;
    store.close().await;
}

/// The broker binary on `ledger` in front of the simulator at `sim_url`, with the bounds of
/// [`quick`].
fn broker_binary(ledger: &Ledger, sim_url: &str) -> std::process::Command {
    let mut command = common::broker_command_on(ledger, sim_url);
    command.envs([
        ("GIROIDENT_BROKER_SERVER__REQUEST_TIMEOUT_SECS", "2"),
        ("GIROIDENT_BROKER_RESILIENCE__SESSION_BUDGET_MS", "2000"),
        ("GIROIDENT_BROKER_FINAPI__REQUEST_TIMEOUT_MS", "1000"),
        ("GIROIDENT_BROKER_AUTH__DISABLED", "true"),
        ("GIROIDENT_BROKER_IDENTITIES__REAPER_INTERVAL_SECS", "1"),
        ("GIROIDENT_BROKER_IDENTITIES__ORPHAN_MIN_AGE_SECS", "10"),
    ]);
    command
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_killed_with_reserved_intents_leaves_them_to_the_reaper_as_never_created() {
    let ledger = common::sqlite_ledger();
    let sim = sim::start(SimConfig::default()).await.expect("simulator");
    let (mut first, url) =
        common::spawn_broker_binary(broker_binary(&ledger, &sim.base_url()), None);
    let http = common::client_with_key(TEST_API_KEY);
    for _ in 0..2 {
        let answer = http
            .post(format!("{url}/kyc-sessions"))
            .json(&json!({"flow": "access"}))
            .send()
            .await
            .expect("an answer");
        common::expect_created(answer).await;
    }
    // The second session asked for a refill: wait for its commit, then kill the broker with
    // the entry in memory.
    let store = store(&ledger).await;
    let started = Instant::now();
    let reserved = loop {
        let [intents, active, _, _] = counts(&store).await;
        assert_eq!(active, 2);
        if intents > 0 {
            break intents;
        }
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "nothing reserved"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    first.kill().expect("SIGKILL");
    let _ = first.wait();
    assert_eq!(counts(&store).await, [reserved, 2, 0, 0]);

    // The next broker's reaper resolves each once older than orphan_min_age: finAPI does not
    // know the user (two 400s to its login), so it is closed as never created.
    let (mut second, _url) =
        common::spawn_broker_binary(broker_binary(&ledger, &sim.base_url()), None);
    let resolved = loop {
        let now = counts(&store).await;
        if now[3] == reserved || started.elapsed() > Duration::from_secs(30) {
            break now;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let _ = second.kill();
    let _ = second.wait();
    assert_eq!(resolved, [0, 2, 0, reserved]);
    let stats = sim.stats();
    assert_eq!(
        stats.get(PASSWORD_TOKEN).and_then(|s| s.get("400")),
        Some(&(2 * reserved)),
        "{stats:?}"
    );
    assert!(!stats.contains_key(DELETE_USER), "{stats:?}");
    // finAPI holds exactly the two users of the answered sessions: none leaked.
    assert_eq!(sim.state().user_passwords().len(), 2);
    store.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_password_key_retires_the_reserved_intents_of_the_old_one() {
    use giroident_broker::identities::keys::{PasswordKey, PasswordKeys};
    let ledger = common::sqlite_ledger();
    // Entries usable for (60 s − 2 s) / 2 = 29 s: the sweep does not come first.
    let env = env_on(&ledger, |s| s.identities.orphan_min_age_secs = 60).await;
    let store = store(&ledger).await;
    warm_up(&env).await;
    let ready = env.flows.reserved_intents_ready() as u64;
    let key = |k: &str| PasswordKey::new(k.to_owned().into()).expect("a long key");
    let newest = key("reserved-test-password-key-B-0123456789abcdef");
    let newest_id = newest.id().to_owned();
    // What a reload (SIGHUP) with a new key, the old one kept as previous, swaps in.
    env.flows.replace_password_keys(PasswordKeys::new(
        newest,
        vec![key(common::TEST_PASSWORD_KEY)],
    ));
    let discarded = common::eventually(Duration::from_secs(5), || {
        env.flows.reserved_intent_counts().discarded == ready
    })
    .await;
    assert!(discarded, "{:?}", env.flows.reserved_intent_counts());
    assert_eq!(counts(&store).await, [0, 2, 0, 0]);
    let session = env.access_session().await;
    let record = store
        .find_by_finapi_user(session["userId"].as_str().unwrap())
        .await
        .expect("find")
        .expect("recorded");
    assert_eq!(record.key_id, newest_id);
    assert_eq!(env.flows.reserved_intent_counts().taken, 0);
    env.stop().await;
    store.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn intents_written_ahead_do_not_keep_a_reload_from_dropping_their_key() {
    let ledger = common::sqlite_ledger();
    // Entries usable for (60 s − 2 s) / 2 = 29 s: they are still in the pool at the reload.
    let env = env_on(&ledger, |s| s.identities.orphan_min_age_secs = 60).await;
    let first = env.access_session().await;
    let second = env.access_session().await;
    let ready = common::eventually(Duration::from_secs(5), || {
        env.flows.reserved_intents_ready() > 0
    })
    .await;
    assert!(ready, "no intent was written ahead");
    // The two identities made with the key are deleted: nothing that lives needs it.
    for session in [first, second] {
        let token = session["accessToken"].as_str().expect("a token");
        assert_eq!(env.delete_current(token).await.status(), 204);
    }
    // What a reload that drops the key asks before it applies (`reload.rs`): unused entries,
    // which the new key retires without a finAPI call, are no identity that needs it.
    let in_use = env.flows.password_keys_in_use().await.expect("key counts");
    assert!(in_use.iter().all(|(_, count)| *count == 0), "{in_use:?}");
    env.stop().await;
}
