//! Managed finAPI identities end to end: the real broker, the real simulator and a real ledger
//! (a SQLite file; PostgreSQL where replicas matter, in `tests/identities_postgres.rs`).

mod common;

use std::time::Duration;

use common::{CREATE_USER, DELETE_USER, PASSWORD_TOKEN, TestEnv};
use giroident_broker::config::{CallerSettings, FlowKind, Settings};
use giroident_broker::demo::Ledger;
use giroident_broker::identities::{EventKind, IdentityState};
use giroident_broker::sim::{self, FaultRule, SimConfig};
use secrecy::{ExposeSecret, SecretString};
use serde_json::{Value, json};

const OTHER_KEY: &str = "other-caller-key-0123456789";
const STANDALONE_ONLY_KEY: &str = "standalone-only-key-0123456789";

/// Short timeouts, a reaper every second, and two more callers: `other` (both flows) and
/// `standalone-only`.
pub fn quick(s: &mut Settings) {
    common::quick_ledger(s, 3);
    s.resilience.base_backoff_ms = 10;
    s.resilience.max_backoff_ms = 50;
    s.auth.callers.push(CallerSettings::from_key(
        "other",
        OTHER_KEY.as_bytes(),
        &[FlowKind::Standalone, FlowKind::Access],
    ));
    s.auth.callers.push(CallerSettings::from_key(
        "standalone-only",
        STANDALONE_ONLY_KEY.as_bytes(),
        &[FlowKind::Standalone],
    ));
}

async fn env_with(ledger: &Ledger, tweak: impl FnOnce(&mut Settings)) -> TestEnv {
    let sim = sim::start(SimConfig::default()).await.expect("simulator");
    env_on(sim, ledger, tweak).await
}

async fn env_on(
    sim: sim::SimHandle,
    ledger: &Ledger,
    tweak: impl FnOnce(&mut Settings),
) -> TestEnv {
    let mut settings = common::settings_with_ledger(&sim, ledger);
    quick(&mut settings);
    tweak(&mut settings);
    TestEnv::with_settings(sim, &settings).await
}

use common::ledger_store as store;

fn access(reference: &str) -> Value {
    json!({"flow": "access", "clientReference": reference})
}

async fn get_identity(env: &TestEnv, http: &reqwest::Client, reference: &str) -> reqwest::Response {
    http.get(format!("{}/identities/{reference}", env.broker_url))
        .send()
        .await
        .expect("answer")
}

/// The reference's record once its `state` reads `expected`, or the last one read after
/// `within`. The reaper records a deletion only after finAPI answered it, so a test that saw the
/// simulator's call waits for the ledger's commit (a synced one, at `sqlite_synchronous =
/// "full"`) here.
async fn state_within(env: &TestEnv, reference: &str, expected: &str, within: Duration) -> Value {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let record: Value = get_identity(env, &env.http, reference)
            .await
            .json()
            .await
            .expect("a record");
        if record["state"] == expected || tokio::time::Instant::now() >= deadline {
            return record;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The `kind`s of a shown record's `events`, newest first.
fn event_kinds(record: &Value) -> Vec<&str> {
    record["events"]
        .as_array()
        .expect("events")
        .iter()
        .map(|e| e["kind"].as_str().expect("a kind"))
        .collect()
}

/// `DELETE /identities/{reference}` while finAPI answers the user's deletion `423` (locked,
/// once): the deletion is scheduled.
async fn delete_locked_identity(env: &TestEnv, reference: &str) -> reqwest::Response {
    env.sim.add_fault(FaultRule {
        endpoint: DELETE_USER.into(),
        status: Some(423),
        count: Some(1),
        ..FaultRule::default()
    });
    delete_identity(env, &env.http, reference).await
}

async fn delete_identity(
    env: &TestEnv,
    http: &reqwest::Client,
    reference: &str,
) -> reqwest::Response {
    http.delete(format!("{}/identities/{reference}", env.broker_url))
        .send()
        .await
        .expect("answer")
}

#[tokio::test]
async fn a_session_without_reference_gets_a_recorded_identity_of_its_own() {
    let ledger = common::sqlite_ledger();
    let env = env_with(&ledger, |_| {}).await;
    let first = common::expect_created(env.start_session(json!({"flow": "access"})).await).await;
    let second = common::expect_created(env.start_session(json!({"flow": "access"})).await).await;
    assert_eq!(first["identity"], "created");
    assert_eq!(second["identity"], "created");
    assert_ne!(first["userId"], second["userId"]);
    assert!(
        first["deleteAfter"]
            .as_str()
            .is_some_and(|d| d.ends_with('Z'))
    );
    let store = store(&ledger).await;
    for session in [&first, &second] {
        let record = store
            .find_by_finapi_user(session["userId"].as_str().unwrap())
            .await
            .unwrap()
            .expect("recorded");
        assert_eq!(record.state, IdentityState::Active);
        assert_eq!(record.caller, "demo");
        assert!(record.reference_digest.is_none());
    }
    env.stop().await;
}

#[tokio::test]
async fn a_reference_keeps_one_identity_and_later_sessions_reuse_it() {
    let ledger = common::sqlite_ledger();
    let env = env_with(&ledger, |_| {}).await;
    let first = common::expect_created(env.start_session(access("customer-1")).await).await;
    let second = common::expect_created(env.start_session(access("customer-1")).await).await;
    assert_eq!(first["identity"], "created");
    assert_eq!(second["identity"], "reused");
    assert_eq!(first["userId"], second["userId"]);
    // finAPI hands out the same token while it is valid.
    assert_eq!(first["accessToken"], second["accessToken"]);
    assert_eq!(env.all_calls(CREATE_USER), 1);
    assert_eq!(env.all_calls(PASSWORD_TOKEN), 2);
    env.stop().await;
}

#[tokio::test]
async fn fifty_concurrent_first_sessions_for_one_reference_create_one_user() {
    let ledger = common::sqlite_ledger();
    let env = env_with(&ledger, |_| {}).await;
    let sessions = (0..50).map(|_| env.start_session(access("customer-50")));
    let answers = futures_util::future::join_all(sessions).await;
    let mut users = std::collections::HashSet::new();
    for answer in answers {
        let body = common::expect_created(answer).await;
        users.insert(body["userId"].as_str().unwrap().to_owned());
    }
    assert_eq!(users.len(), 1);
    assert_eq!(env.all_calls(CREATE_USER), 1);
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_sessions_with_and_without_references_are_each_recorded_once() {
    let ledger = common::sqlite_ledger();
    let env = env_with(&ledger, |_| {}).await;
    // 40 sessions without a reference and 40 for 4 references (10 each), all at once: their
    // ledger writes share commits.
    let bodies: Vec<Value> = (0..80)
        .map(|n| match n % 2 {
            0 => json!({"flow": "access"}),
            _ => access(&format!("customer-{}", n % 8)),
        })
        .collect();
    let answers =
        futures_util::future::join_all(bodies.iter().map(|b| env.start_session(b.clone()))).await;
    let mut by_reference: std::collections::HashMap<String, Vec<Value>> = Default::default();
    let mut unreferenced = std::collections::HashSet::new();
    for (body, answer) in bodies.iter().zip(answers) {
        let session = common::expect_created(answer).await;
        match body["clientReference"].as_str() {
            Some(reference) => by_reference
                .entry(reference.to_owned())
                .or_default()
                .push(session),
            None => {
                assert_eq!(session["identity"], "created");
                assert!(unreferenced.insert(session["userId"].as_str().unwrap().to_owned()));
            }
        }
    }
    assert_eq!(unreferenced.len(), 40);
    assert_eq!(by_reference.len(), 4);
    for sessions in by_reference.values() {
        let users: std::collections::HashSet<&str> = sessions
            .iter()
            .map(|s| s["userId"].as_str().unwrap())
            .collect();
        assert_eq!(users.len(), 1, "one identity per reference: {sessions:?}");
        let created = sessions
            .iter()
            .filter(|s| s["identity"] == "created")
            .count();
        assert_eq!(created, 1, "{sessions:?}");
    }
    assert_eq!(env.all_calls(CREATE_USER), 44);
    // Read after a graceful shutdown, which takes the intents written ahead for sessions
    // without a reference (reserved intents) out of the ledger.
    env.stop().await;

    let store = store(&ledger).await;
    let counts = store.counts_by_state().await.expect("counts");
    assert_eq!(counts[0], (IdentityState::Intent, 0));
    assert_eq!(counts[1], (IdentityState::Active, 44));
    let mut reused = 0;
    let users = unreferenced.iter().map(String::as_str).chain(
        by_reference
            .values()
            .map(|sessions| sessions[0]["userId"].as_str().unwrap()),
    );
    for user in users {
        let record = store
            .find_by_finapi_user(user)
            .await
            .expect("find")
            .expect("recorded");
        let events = store.recent_events(record.id, 20).await.expect("events");
        let kinds: Vec<EventKind> = events.iter().map(|e| e.kind).collect();
        assert_eq!(
            kinds.iter().filter(|k| **k == EventKind::Created).count(),
            1,
            "{kinds:?}"
        );
        assert!(
            events
                .iter()
                .all(|e| e.caller == "demo" && e.request_id.is_some())
        );
        reused += kinds.iter().filter(|k| **k == EventKind::Reused).count();
    }
    assert_eq!(reused, 36, "the other sessions of each reference reused it");
}

#[tokio::test]
async fn an_identity_is_reused_across_broker_restarts() {
    let ledger = common::sqlite_ledger();
    let sim = sim::start(SimConfig::default()).await.expect("simulator");
    let sim_url = sim.base_url();
    let env = env_on(sim, &ledger, |_| {}).await;
    let first = common::expect_created(env.start_session(access("customer-r")).await).await;
    let sim = env.stop_broker_keep_sim().await;
    assert_eq!(sim.base_url(), sim_url);
    let env = env_on(sim, &ledger, |_| {}).await;
    let second = common::expect_created(env.start_session(access("customer-r")).await).await;
    assert_eq!(second["identity"], "reused");
    assert_eq!(first["userId"], second["userId"]);
    env.stop().await;
}

#[tokio::test]
async fn identities_made_with_a_rotated_key_are_still_reused_and_deleted() {
    let ledger = common::sqlite_ledger();
    let old_key_file = std::env::temp_dir().join(format!(
        "giroident-broker-old-key-{}",
        uuid::Uuid::new_v4().simple()
    ));
    std::fs::write(&old_key_file, ledger.password_key.expose_secret()).unwrap();
    let sim = sim::start(SimConfig::default()).await.expect("simulator");
    let env = env_on(sim, &ledger, |_| {}).await;
    let first = common::expect_created(env.start_session(access("customer-k")).await).await;
    let sim = env.stop_broker_keep_sim().await;
    let rotated = Ledger {
        database_url: ledger.database_url.clone(),
        password_key: SecretString::from("a-brand-new-password-key-0123456789-xyz".to_owned()),
    };
    let env = env_on(sim, &rotated, |s| {
        s.identities.previous_password_keys = vec![SecretString::from(
            std::fs::read_to_string(&old_key_file).unwrap(),
        )];
    })
    .await;
    let second = common::expect_created(env.start_session(access("customer-k")).await).await;
    assert_eq!(second["identity"], "reused");
    assert_eq!(first["userId"], second["userId"]);
    // New identities use the new key; the old one still logs in for deletion.
    let fresh = common::expect_created(env.start_session(access("customer-n")).await).await;
    assert_eq!(fresh["identity"], "created");
    let deleted = delete_identity(&env, &env.http, "customer-k").await;
    assert_eq!(deleted.status(), 204);
    assert_eq!(env.calls(DELETE_USER, "200"), 1);
    let _ = std::fs::remove_file(old_key_file);
    env.stop().await;
}

#[tokio::test]
async fn the_identity_endpoints_show_and_delete_only_the_callers_own() {
    let ledger = common::sqlite_ledger();
    let env = env_with(&ledger, |_| {}).await;
    let created = common::expect_created(env.start_session(access("customer-7")).await).await;
    common::expect_created(env.start_session(access("customer-7")).await).await;

    let shown = get_identity(&env, &env.http, "customer-7").await;
    assert_eq!(shown.status(), 200);
    let record: Value = shown.json().await.unwrap();
    assert_eq!(record["state"], "active");
    assert_eq!(record["userId"], created["userId"]);
    let kinds = event_kinds(&record);
    assert_eq!(kinds, ["reused", "created"]);

    let other = common::client_with_key(OTHER_KEY);
    common::expect_problem(
        get_identity(&env, &other, "customer-7").await,
        404,
        "IDENTITY_NOT_FOUND",
    )
    .await;
    common::expect_problem(
        delete_identity(&env, &other, "customer-7").await,
        404,
        "IDENTITY_NOT_FOUND",
    )
    .await;
    let standalone_only = common::client_with_key(STANDALONE_ONLY_KEY);
    common::expect_problem(
        delete_identity(&env, &standalone_only, "customer-7").await,
        403,
        "FLOW_NOT_ALLOWED",
    )
    .await;
    common::expect_problem(
        get_identity(&env, &env.http, "no%20such").await,
        422,
        "INVALID_FIELD",
    )
    .await;
    common::expect_problem(
        get_identity(&env, &env.http, "customer-8").await,
        404,
        "IDENTITY_NOT_FOUND",
    )
    .await;

    let deleted = delete_identity(&env, &env.http, "customer-7").await;
    assert_eq!(deleted.status(), 204);
    assert_eq!(env.calls(DELETE_USER, "200"), 1);
    let record: Value = get_identity(&env, &env.http, "customer-7")
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(record["state"], "deleted");
    assert!(record["deletedAt"].is_string());
    common::expect_problem(
        delete_identity(&env, &env.http, "customer-7").await,
        404,
        "IDENTITY_NOT_FOUND",
    )
    .await;
    // The token of the deleted user no longer works at finAPI.
    let token = created["accessToken"].as_str().unwrap();
    assert_eq!(env.sim_user(token).await.status(), 401);
    // A new session for the reference makes a new identity.
    let again = common::expect_created(env.start_session(access("customer-7")).await).await;
    assert_eq!(again["identity"], "created");
    assert_ne!(again["userId"], created["userId"]);
    env.stop().await;
}

/// Four concurrent `DELETE`s of one identity answered `404 204 404 204`: two of them deleted
/// the user at finAPI and the ledger recorded two `deleted` events. The first claims the record;
/// the others leave it to that request. Checked: one deletion at finAPI and one `deleted` event,
/// whatever the interleaving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_deletions_of_one_identity_delete_it_once() {
    let ledger = common::sqlite_ledger();
    let env = env_with(&ledger, |_| {}).await;
    common::concurrent_deletes_delete_once(&env, "race-1").await;
    env.stop().await;
}

/// An identity record is per-caller data, but `GET` answered it (and `DELETE` its `202`)
/// without `Cache-Control`, so a shared cache on the way could keep it and show it to others.
#[tokio::test]
async fn answers_that_carry_an_identity_record_are_not_stored_by_caches() {
    let ledger = common::sqlite_ledger();
    let env = env_with(&ledger, |_| {}).await;
    common::expect_created(env.start_session(access("customer-c")).await).await;
    let cache_control = |answer: &reqwest::Response| {
        answer
            .headers()
            .get("cache-control")
            .map(|v| v.to_str().unwrap().to_owned())
    };
    let shown = get_identity(&env, &env.http, "customer-c").await;
    assert_eq!(shown.status(), 200);
    assert_eq!(cache_control(&shown).as_deref(), Some("no-store"));
    let scheduled = delete_locked_identity(&env, "customer-c").await;
    assert_eq!(scheduled.status(), 202);
    assert_eq!(cache_control(&scheduled).as_deref(), Some("no-store"));
    env.stop().await;
}

#[tokio::test]
async fn a_locked_user_is_scheduled_for_deletion_and_the_reaper_deletes_it_later() {
    let ledger = common::sqlite_ledger();
    let env = env_with(&ledger, |_| {}).await;
    common::expect_created(env.start_session(access("customer-l")).await).await;
    let scheduled = delete_locked_identity(&env, "customer-l").await;
    assert_eq!(scheduled.status(), 202);
    let record: Value = scheduled.json().await.unwrap();
    assert_eq!(record["state"], "deleting");
    assert_eq!(record["deletionAttempts"], 1);
    assert_eq!(record["lastError"], "LOCKED");
    // The reaper tries again (reaper interval 1 s, first backoff one interval).
    let deleted = common::eventually(Duration::from_secs(10), || {
        env.calls(DELETE_USER, "200") == 1
    })
    .await;
    assert!(
        deleted,
        "the reaper did not delete the user: {:?}",
        env.sim.stats()
    );
    let record = state_within(&env, "customer-l", "deleted", Duration::from_secs(10)).await;
    assert_eq!(record["state"], "deleted");
    env.stop().await;
}

#[tokio::test]
async fn identities_are_deleted_by_the_reaper_after_their_retention() {
    let ledger = common::sqlite_ledger();
    let env = env_with(&ledger, |s| s.identities.retention_secs = 1).await;
    let session = common::expect_created(env.start_session(access("customer-t")).await).await;
    let deleted = common::eventually(Duration::from_secs(10), || {
        env.calls(DELETE_USER, "200") == 1
    })
    .await;
    assert!(deleted, "not deleted: {:?}", env.sim.stats());
    let shown = state_within(&env, "customer-t", "deleted", Duration::from_secs(10)).await;
    assert_eq!(shown["state"], "deleted");
    let store = store(&ledger).await;
    let record = store
        .find_by_finapi_user(session["userId"].as_str().unwrap())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(record.state, IdentityState::Deleted);
    // The recorder is shared by every test of this binary: at least this deletion is in it.
    let metrics = env.metrics_text().await;
    let deleted = metrics
        .lines()
        .find_map(|l| l.strip_prefix("broker_identity_deletions_total{outcome=\"deleted\"} "))
        .and_then(|v| v.parse::<f64>().ok());
    assert!(deleted.is_some_and(|n| n >= 1.0), "{metrics}");
    for gauge in [
        "broker_identities{state=\"deleted\"}",
        "broker_identity_oldest_overdue_seconds",
        "broker_identity_store_up 1",
    ] {
        assert!(metrics.contains(gauge), "{gauge} missing: {metrics}");
    }
    env.stop().await;
}

/// The activation is written beside the token grant: a user finAPI created whose token could
/// then not be had is recorded as created and is the reaper's at once, since no lost `POST` can
/// still create it; the reaper does not wait for `orphan_min_age` (60 s here).
#[tokio::test]
async fn a_created_user_whose_token_failed_is_deleted_without_waiting_for_the_orphan_age() {
    let ledger = common::sqlite_ledger();
    let env = env_with(&ledger, |s| s.identities.orphan_min_age_secs = 60).await;
    env.sim.add_fault(FaultRule {
        endpoint: PASSWORD_TOKEN.into(),
        status: Some(500),
        count: Some(8),
        ..FaultRule::default()
    });
    let failed = env.start_session(access("customer-grant")).await;
    common::expect_problem(failed, 502, "UPSTREAM_ERROR").await;
    assert_eq!(env.calls(CREATE_USER, "201"), 1);
    env.sim.clear_faults();
    let deleted = common::eventually(Duration::from_secs(10), || {
        env.calls(DELETE_USER, "200") == 1
    })
    .await;
    assert!(deleted, "not deleted: {:?}", env.sim.stats());
    let record = state_within(&env, "customer-grant", "deleted", Duration::from_secs(5)).await;
    assert_eq!(record["state"], "deleted");
    let kinds = event_kinds(&record);
    assert_eq!(kinds, ["deleted", "created"], "{record}");
    env.stop().await;
}

#[tokio::test]
async fn a_user_whose_token_could_not_be_had_is_deleted_by_the_reaper() {
    let ledger = common::sqlite_ledger();
    let env = env_with(&ledger, |_| {}).await;
    env.sim.add_fault(FaultRule {
        endpoint: PASSWORD_TOKEN.into(),
        status: Some(500),
        count: Some(8),
        ..FaultRule::default()
    });
    let failed = env.start_session(access("customer-o")).await;
    common::expect_problem(failed, 502, "UPSTREAM_ERROR").await;
    assert_eq!(env.calls(CREATE_USER, "201"), 1);
    env.sim.clear_faults();
    // The failed identity no longer blocks the reference.
    let next = common::expect_created(env.start_session(access("customer-o")).await).await;
    assert_eq!(next["identity"], "created");
    // It was active (its activation commits beside the grant): the reaper deletes it at once.
    let deleted = common::eventually(Duration::from_secs(15), || {
        env.calls(DELETE_USER, "200") == 1
    })
    .await;
    assert!(deleted, "orphan not deleted: {:?}", env.sim.stats());
    env.stop().await;
}

#[tokio::test]
async fn deleting_through_the_user_token_closes_the_record() {
    let ledger = common::sqlite_ledger();
    let env = env_with(&ledger, |_| {}).await;
    let session = common::expect_created(env.start_session(access("customer-d")).await).await;
    let deleted = env
        .delete_current(session["accessToken"].as_str().unwrap())
        .await;
    assert_eq!(deleted.status(), 204);
    let record: Value = get_identity(&env, &env.http, "customer-d")
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(record["state"], "deleted");
    assert_eq!(record["events"][0]["kind"], "deleted");
    env.stop().await;
}

#[tokio::test]
async fn the_ledger_holds_no_credential_and_no_personal_data() {
    let ledger = common::sqlite_ledger();
    let env = env_with(&ledger, |_| {}).await;
    let body = json!({"flow": "access", "clientReference": "customer-secret-ref",
        "email": "jane.secret@example.com", "phone": "+49 89 1234567"});
    let session = common::expect_created(env.start_session(body).await).await;
    let token = session["accessToken"].as_str().unwrap().to_owned();
    let user_id = session["userId"].as_str().unwrap().to_owned();
    let key = giroident_broker::identities::keys::PasswordKey::new(SecretString::from(
        common::TEST_PASSWORD_KEY,
    ))
    .unwrap();
    let password = key.password(&user_id).expose_secret().to_owned();
    env.stop().await;
    let path = ledger
        .database_url
        .expose_secret()
        .strip_prefix("sqlite://")
        .unwrap()
        .to_owned();
    let mut bytes = Vec::new();
    for file in [path.clone(), format!("{path}-wal")] {
        if let Ok(content) = std::fs::read(&file) {
            bytes.extend(content);
        }
    }
    let text = String::from_utf8_lossy(&bytes);
    assert!(text.contains(&user_id), "the ledger should know the user");
    for secret in [
        token.as_str(),
        password.as_str(),
        common::TEST_PASSWORD_KEY,
        "customer-secret-ref",
        "jane.secret@example.com",
        "1234567",
        common::TEST_API_KEY,
    ] {
        assert!(!text.contains(secret), "the ledger holds {secret:?}");
    }
}

#[tokio::test]
async fn a_callers_own_retention_overrides_the_default() {
    let ledger = common::sqlite_ledger();
    let env = env_with(&ledger, |s| {
        s.identities.retention_secs = 86_400;
        let other = s
            .auth
            .callers
            .iter_mut()
            .find(|c| c.name == "other")
            .unwrap();
        other.retention_secs = Some(1);
    })
    .await;
    let kept = common::expect_created(env.start_session(access("customer-kept")).await).await;
    let other = common::client_with_key(OTHER_KEY);
    let short = other
        .post(format!("{}/kyc-sessions", env.broker_url))
        .json(&access("customer-short"))
        .send()
        .await
        .unwrap();
    common::expect_created(short).await;
    let deleted = common::eventually(Duration::from_secs(10), || {
        env.calls(DELETE_USER, "200") == 1
    })
    .await;
    assert!(
        deleted,
        "the short-lived identity was not deleted: {:?}",
        env.sim.stats()
    );
    let record: Value = get_identity(&env, &env.http, "customer-kept")
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(record["state"], "active");
    assert_eq!(record["userId"], kept["userId"]);
    env.stop().await;
}

#[tokio::test]
async fn an_identity_finapi_never_created_is_closed_without_a_deletion() {
    let ledger = common::sqlite_ledger();
    let env = env_with(&ledger, |_| {}).await;
    env.sim.add_fault(FaultRule {
        endpoint: CREATE_USER.into(),
        status: Some(400),
        count: Some(1),
        ..FaultRule::default()
    });
    let refused = env.start_session(access("customer-never")).await;
    common::expect_problem(refused, 502, "UPSTREAM_REJECTED").await;
    // After orphan_min_age (3 s) the reaper logs in, and finAPI knows no such user, twice in a
    // row: closed.
    let closed = common::eventually(Duration::from_secs(15), || {
        env.calls(PASSWORD_TOKEN, "400") == 2
    })
    .await;
    assert!(closed, "the reaper did not look: {:?}", env.sim.stats());
    let record = loop {
        let record: Value = get_identity(&env, &env.http, "customer-never")
            .await
            .json()
            .await
            .unwrap();
        if record["state"] == "deleted" {
            break record;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(record["events"][0]["kind"], "never_created");
    assert_eq!(env.all_calls(DELETE_USER), 0);
    env.stop().await;
}

#[tokio::test]
async fn a_session_whose_identity_is_deleted_meanwhile_gets_a_new_one() {
    let ledger = common::sqlite_ledger();
    let env = env_with(&ledger, |_| {}).await;
    let first = common::expect_created(env.start_session(access("customer-race")).await).await;
    // The reuse's token answer takes a while; the caller deletes the identity meanwhile.
    env.sim.add_fault(FaultRule {
        endpoint: PASSWORD_TOKEN.into(),
        stall_after_bytes: Some(10),
        stall_ms: Some(600),
        count: Some(1),
        ..FaultRule::default()
    });
    let session = spawn_session(&env, "customer-race");
    let arrived = common::eventually(Duration::from_secs(5), || {
        env.sim
            .stats()
            .get(PASSWORD_TOKEN)
            .is_some_and(|s| s.get("200") == Some(&1))
    })
    .await;
    assert!(arrived);
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(
        delete_identity(&env, &env.http, "customer-race")
            .await
            .status(),
        204
    );
    let second = common::expect_created(session.await.unwrap()).await;
    // Not the deleted identity's dead token: a new identity that lives.
    assert_eq!(second["identity"], "created", "{second}");
    assert_ne!(second["userId"], first["userId"]);
    let token = second["accessToken"].as_str().unwrap();
    assert_eq!(env.sim_user(token).await.status(), 200);
    env.stop().await;
}

#[tokio::test]
async fn one_stray_400_to_the_login_does_not_close_a_live_identity() {
    let ledger = common::sqlite_ledger();
    let env = env_with(&ledger, |_| {}).await;
    let session = common::expect_created(env.start_session(access("customer-400")).await).await;
    env.sim.add_fault(FaultRule {
        endpoint: PASSWORD_TOKEN.into(),
        status: Some(400),
        count: Some(1),
        ..FaultRule::default()
    });
    assert_eq!(
        delete_identity(&env, &env.http, "customer-400")
            .await
            .status(),
        204
    );
    // The second login worked, and the user really is deleted.
    assert_eq!(env.calls(DELETE_USER, "200"), 1);
    let token = session["accessToken"].as_str().unwrap();
    assert_eq!(env.sim_user(token).await.status(), 401);
    env.stop().await;
}

#[tokio::test]
async fn a_reference_that_does_not_decode_is_an_invalid_field() {
    let ledger = common::sqlite_ledger();
    let env = env_with(&ledger, |_| {}).await;
    for path in ["%FF", "a%20b"] {
        common::expect_problem(
            get_identity(&env, &env.http, path).await,
            422,
            "INVALID_FIELD",
        )
        .await;
    }
    env.stop().await;
}

/// The ledger's file, its write-ahead log and its shared-memory index overwritten in place
/// (same size, no truncation) while the broker holds them open: the writer thread's next
/// transaction finds no valid log and a first page that is not SQLite's, and the session is
/// refused as the ledger being unavailable, with no finAPI user created.
#[tokio::test]
async fn a_ledger_file_that_becomes_unusable_refuses_sessions_with_store_unavailable() {
    let ledger = common::sqlite_ledger();
    let env = env_with(&ledger, |_| {}).await;
    common::expect_created(env.start_session(json!({"flow": "access"})).await).await;
    let path = common::overwrite_sqlite_ledger(&ledger);
    let users_before = env.all_calls(CREATE_USER);
    // No reference: nothing is read first, the intent goes straight to the writer thread.
    let refused = env.start_session(json!({"flow": "access"})).await;
    let problem = common::expect_problem(refused, 503, "STORE_UNAVAILABLE").await;
    assert!(!problem.to_string().contains(&path), "{problem}");
    assert_eq!(
        env.all_calls(CREATE_USER),
        users_before,
        "no finAPI user without a durable intent"
    );
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ledger_file_deleted_under_the_broker_makes_it_unavailable_not_forgetful() {
    let dir = common::pg::TempDir::new("giroident-deleted-ledger");
    let ledger = common::ledger_at(&format!(
        "sqlite://{}",
        dir.path().join("ledger.db").display()
    ));
    let env = env_with(&ledger, |_| {}).await;
    common::expect_created(env.start_session(json!({"flow": "access"})).await).await;
    // The open connections keep the unlinked file: SQLite would go on committing into it, and
    // every record made from now on would vanish with the process.
    std::fs::remove_dir_all(dir.path()).expect("ledger directory removed");
    let users_before = env.all_calls(CREATE_USER);
    for _ in 0..3 {
        let refused = env.start_session(json!({"flow": "access"})).await;
        common::expect_problem(refused, 503, "STORE_UNAVAILABLE").await;
    }
    assert_eq!(
        env.all_calls(CREATE_USER),
        users_before,
        "no finAPI user whose intent is only in a deleted file"
    );
    let ready = env
        .http
        .get(format!("{}/readyz", env.broker_url))
        .send()
        .await
        .expect("readyz answers");
    let ready: Value = ready.json().await.expect("readyz JSON");
    assert_eq!(ready["identityStore"], "unavailable", "{ready}");
    env.stop().await;
}

/// `DELETE /identities/{ref}` twice while the reference's first session is still creating its
/// user (`POST /api/v2/users` held open by finAPI). The first `DELETE` found the intent and
/// scheduled it; the second found it `deleting`, claimed it, logged in before finAPI had made
/// the user, got "unknown" twice and closed the record as never created (`204`). finAPI then
/// created the user: a live user whose record said `deleted`, which nothing would ever delete.
/// Both must leave it to the reaper until no lost `POST` can still create it; the reaper then
/// deletes it exactly once, and the session gets an identity of its own that lives.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deletions_while_the_first_session_creates_the_user_lose_no_user() {
    let ledger = common::sqlite_ledger();
    let env = env_with(&ledger, |_| {}).await;
    env.sim.add_fault(FaultRule {
        endpoint: CREATE_USER.into(),
        latency_ms: Some(700),
        count: Some(1),
        ..FaultRule::default()
    });
    let session = spawn_session(&env, "customer-mid");
    // The intent is written before finAPI is asked; the `POST` is then held for 700 ms.
    let intent = state_within(&env, "customer-mid", "intent", Duration::from_secs(2)).await;
    assert_eq!(intent["state"], "intent", "{intent}");
    let first_user = intent["userId"].as_str().unwrap().to_owned();
    for attempt in ["first", "second"] {
        let answer = delete_identity(&env, &env.http, "customer-mid").await;
        assert_eq!(answer.status(), 202, "{attempt} DELETE");
        let record: Value = answer.json().await.unwrap();
        assert_eq!(record["state"], "deleting", "{attempt} DELETE: {record}");
        assert_eq!(record["userId"], first_user.as_str(), "{record}");
    }
    assert_eq!(env.calls(CREATE_USER, "201"), 0, "the POST was still held");
    // The session's activation finds the record deleting: it gets a new identity that lives.
    let second = a_second_identity(&env, session, &first_user).await;
    // Once orphan_min_age (3 s) has passed, the reaper deletes the first user, once.
    let deleted = common::eventually(Duration::from_secs(15), || {
        env.calls(DELETE_USER, "200") == 1
    })
    .await;
    assert!(deleted, "first user not deleted: {:?}", env.sim.stats());
    let store = store(&ledger).await;
    let mut first = None;
    for _ in 0..250 {
        first = store.find_by_finapi_user(&first_user).await.unwrap();
        if first
            .as_ref()
            .is_some_and(|r| r.state == IdentityState::Deleted)
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let first = first.expect("the first user's record");
    assert_eq!(first.state, IdentityState::Deleted);
    let kinds: Vec<EventKind> = store
        .recent_events(first.id, 20)
        .await
        .unwrap()
        .into_iter()
        .map(|e| e.kind)
        .collect();
    assert_eq!(kinds, [EventKind::Deleted, EventKind::Created], "{kinds:?}");
    only_it_lives(&env, "customer-mid", &second).await;
    assert_eq!(env.all_calls(DELETE_USER), 1, "{:?}", env.sim.stats());
    env.stop().await;
}

/// `DELETE /identities/{ref}` while the reference's first session waits for its new user's
/// token: the activation, committed beside the grant, was in before the `DELETE` claimed the
/// record, so the session answered `201 created` with the token of the user just deleted (the
/// `DELETE` had answered `204`). Like a reuse whose deletion begins meanwhile, the session
/// must get an identity that lives; the first user is deleted once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deletion_while_a_new_users_token_is_granted_gives_the_session_a_live_identity() {
    let ledger = common::sqlite_ledger();
    let env = env_with(&ledger, |_| {}).await;
    env.sim.add_fault(FaultRule {
        endpoint: PASSWORD_TOKEN.into(),
        stall_after_bytes: Some(10),
        stall_ms: Some(600),
        count: Some(1),
        ..FaultRule::default()
    });
    let session = spawn_session(&env, "customer-grant-held");
    // The user is made and activated; its token's answer stalls for 600 ms.
    let first = state_within(
        &env,
        "customer-grant-held",
        "active",
        Duration::from_secs(2),
    )
    .await;
    assert_eq!(first["state"], "active", "{first}");
    let deleted = delete_identity(&env, &env.http, "customer-grant-held").await;
    assert_eq!(deleted.status(), 204);
    let first_user = first["userId"].as_str().unwrap();
    let second = a_second_identity(&env, session, first_user).await;
    assert_eq!(env.all_calls(DELETE_USER), 1, "{:?}", env.sim.stats());
    only_it_lives(&env, "customer-grant-held", &second).await;
    env.stop().await;
}

/// An access session for `reference`, started in the background; its answer.
fn spawn_session(env: &TestEnv, reference: &str) -> tokio::task::JoinHandle<reqwest::Response> {
    let (http, url) = (env.http.clone(), env.broker_url.clone());
    let body = access(reference);
    tokio::spawn(async move {
        http.post(format!("{url}/kyc-sessions"))
            .json(&body)
            .send()
            .await
            .unwrap()
    })
}

/// The answer of `session`: a `201` with a new identity, not `first_user` (whose token would die
/// with its deletion), whose token finAPI accepts; two users were created in all.
async fn a_second_identity(
    env: &TestEnv,
    session: tokio::task::JoinHandle<reqwest::Response>,
    first_user: &str,
) -> Value {
    let second = common::expect_created(session.await.unwrap()).await;
    assert_eq!(second["identity"], "created", "{second}");
    assert_ne!(second["userId"], first_user, "the deleted user's token");
    let token = second["accessToken"].as_str().unwrap();
    assert_eq!(env.sim_user(token).await.status(), 200);
    assert_eq!(env.calls(CREATE_USER, "201"), 2);
    second
}

/// Only the user of the session's answer `second` lives at finAPI, and its record is the live
/// one of `reference`.
async fn only_it_lives(env: &TestEnv, reference: &str, second: &Value) {
    assert_eq!(env.sim.state().user_passwords().len(), 1);
    let live: Value = get_identity(env, &env.http, reference)
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(live["state"], "active", "{live}");
    assert_eq!(live["userId"], second["userId"], "{live}");
}
