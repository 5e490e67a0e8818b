//! Crash safety of the identity ledger: the broker binary killed with SIGKILL while finAPI is
//! creating a user leaves no user the ledger does not know; the restarted broker's reaper
//! deletes it. Under `identities.sqlite_synchronous = "intents"` too, where a SIGKILL right
//! after a session also loses none of its unsynced commits.

mod common;

use std::time::{Duration, Instant};

use common::{CREATE_USER, DELETE_USER, TEST_API_KEY};
use giroident_broker::identities::{IdentityState, IdentityStore};
use giroident_broker::sim::{self, FaultRule, SimConfig};
use serde_json::json;

/// The broker binary on `ledger` and the simulator at `sim_url`, its ledger synced as `sync`
/// (`identities.sqlite_synchronous`).
fn configured(
    ledger: &giroident_broker::demo::Ledger,
    sim_url: &str,
    sync: &str,
) -> std::process::Command {
    let callers = common::test_caller("crash", r#"["access"]"#);
    let mut command = common::broker_command_on(ledger, sim_url);
    command.envs([
        ("GIROIDENT_BROKER_SERVER__REQUEST_TIMEOUT_SECS", "5"),
        ("GIROIDENT_BROKER_RESILIENCE__SESSION_BUDGET_MS", "5000"),
        ("GIROIDENT_BROKER_FINAPI__REQUEST_TIMEOUT_MS", "4000"),
        ("GIROIDENT_BROKER_AUTH__CALLERS", &callers),
        ("GIROIDENT_BROKER_IDENTITIES__REAPER_INTERVAL_SECS", "1"),
        ("GIROIDENT_BROKER_IDENTITIES__ORPHAN_MIN_AGE_SECS", "6"),
        ("GIROIDENT_BROKER_IDENTITIES__SQLITE_SYNCHRONOUS", sync),
    ]);
    command
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_killed_while_finapi_creates_a_user_leaves_it_to_the_next_broker() {
    killed_while_finapi_creates_a_user("full").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_only_intents_synced_a_broker_killed_mid_creation_still_leaves_no_unknown_user() {
    killed_while_finapi_creates_a_user("intents").await;
}

async fn killed_while_finapi_creates_a_user(sync: &str) {
    let ledger = common::sqlite_ledger();
    let sim = sim::start(SimConfig::default()).await.expect("simulator");
    // finAPI takes its time to create the user: the broker dies in the middle.
    sim.add_fault(FaultRule {
        endpoint: CREATE_USER.into(),
        latency_ms: Some(1_500),
        count: Some(1),
        ..FaultRule::default()
    });
    let (mut first, url) =
        common::spawn_broker_binary(configured(&ledger, &sim.base_url(), sync), None);
    let http = common::client_with_key(TEST_API_KEY);
    let session = tokio::spawn({
        let http = http.clone();
        let url = url.clone();
        async move {
            http.post(format!("{url}/kyc-sessions"))
                .json(&json!({"flow": "access", "clientReference": "customer-crash"}))
                .send()
                .await
        }
    });
    // Kill the broker while the simulator holds POST /api/v2/users (it follows the client
    // token at once); the simulator still creates the user afterwards.
    let started = Instant::now();
    while !sim.stats().contains_key(common::CLIENT_TOKEN) {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "no call arrived"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    first.kill().expect("SIGKILL");
    let _ = first.wait();
    assert!(session.await.unwrap().is_err(), "the session had no answer");
    let created = common::eventually(Duration::from_secs(5), || {
        sim.stats()
            .get(CREATE_USER)
            .is_some_and(|s| s.contains_key("201") || s.contains_key("dropped"))
    })
    .await;
    assert!(created, "finAPI never finished the call: {:?}", sim.stats());
    assert_eq!(
        sim.state().user_passwords().len(),
        1,
        "finAPI holds the user"
    );

    // The next broker's reaper resolves the intent once no lost call can still create it.
    let (mut second, _url) =
        common::spawn_broker_binary(configured(&ledger, &sim.base_url(), sync), None);
    let deleted = common::eventually(Duration::from_secs(20), || {
        sim.stats()
            .get(DELETE_USER)
            .is_some_and(|s| s.get("200") == Some(&1))
    })
    .await;
    let _ = second.kill();
    let _ = second.wait();
    assert!(
        deleted,
        "the orphaned user was not deleted: {:?}",
        sim.stats()
    );
    assert!(sim.state().user_passwords().is_empty());
}

/// An activation committed without fsync (`"intents"`) is in the OS's page cache when the
/// session is answered: the broker's SIGKILL right after loses nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_only_intents_synced_a_broker_killed_after_its_answer_keeps_the_activation() {
    let ledger = common::sqlite_ledger();
    let sim = sim::start(SimConfig::default()).await.expect("simulator");
    let (mut broker, url) =
        common::spawn_broker_binary(configured(&ledger, &sim.base_url(), "intents"), None);
    let http = common::client_with_key(TEST_API_KEY);
    let answer = http
        .post(format!("{url}/kyc-sessions"))
        .json(&json!({"flow": "access", "clientReference": "customer-kept"}))
        .send()
        .await
        .expect("an answer");
    assert_eq!(answer.status(), 201);
    broker.kill().expect("SIGKILL");
    let _ = broker.wait();

    let store = IdentityStore::connect(&ledger.database_url, 2)
        .await
        .expect("the ledger opens");
    let records = store
        .counts_by_state()
        .await
        .expect("counts")
        .into_iter()
        .filter(|(_, n)| *n > 0)
        .collect::<Vec<_>>();
    assert_eq!(records, vec![(IdentityState::Active, 1)]);
    store.close().await;
}
