//! Crash safety of the identity ledger: the broker binary killed with SIGKILL while finAPI is
//! creating a user leaves no user the ledger does not know; the restarted broker's reaper
//! deletes it.

mod common;

use std::time::{Duration, Instant};

use common::{CREATE_USER, TEST_API_KEY};
use giroident_broker::sim::{self, FaultRule, SimConfig};
use serde_json::json;

const DELETE_USER: &str = "DELETE /api/v2/users";

fn configured(ledger: &giroident_broker::demo::Ledger, sim_url: &str) -> std::process::Command {
    let digest = giroident_broker::config::to_hex(&giroident_broker::config::sha256(
        TEST_API_KEY.as_bytes(),
    ));
    let callers = format!(r#"[{{name = "crash", key_sha256 = "{digest}", flows = ["access"]}}]"#);
    let mut command = common::broker_command(ledger);
    command.envs([
        ("GIROIDENT_BROKER_SERVER__LISTEN", "127.0.0.1:0"),
        ("GIROIDENT_BROKER_ADMIN__LISTEN", "127.0.0.1:0"),
        ("GIROIDENT_BROKER_SERVER__REQUEST_TIMEOUT_SECS", "5"),
        ("GIROIDENT_BROKER_RESILIENCE__SESSION_BUDGET_MS", "5000"),
        ("GIROIDENT_BROKER_FINAPI__REQUEST_TIMEOUT_MS", "4000"),
        ("GIROIDENT_BROKER_FINAPI__ACCESS_URL", sim_url),
        ("GIROIDENT_BROKER_FINAPI__PROCESS_CONTROLLER_URL", sim_url),
        ("GIROIDENT_BROKER_FINAPI__ALLOW_INSECURE_HTTP", "true"),
        ("GIROIDENT_BROKER_FINAPI__CLIENT_ID", sim::DEMO_CLIENT_ID),
        (
            "GIROIDENT_BROKER_FINAPI__CLIENT_SECRET",
            sim::DEMO_CLIENT_SECRET,
        ),
        ("GIROIDENT_BROKER_AUTH__CALLERS", &callers),
        ("GIROIDENT_BROKER_IDENTITIES__REAPER_INTERVAL_SECS", "1"),
        ("GIROIDENT_BROKER_IDENTITIES__ORPHAN_MIN_AGE_SECS", "6"),
        ("GIROIDENT_BROKER_LOG__FILTER", "info"),
    ]);
    command
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_killed_while_finapi_creates_a_user_leaves_it_to_the_next_broker() {
    let ledger = common::sqlite_ledger();
    let sim = sim::start(SimConfig::default()).await.expect("simulator");
    // finAPI takes its time to create the user: the broker dies in the middle.
    sim.add_fault(FaultRule {
        endpoint: CREATE_USER.into(),
        latency_ms: Some(1_500),
        count: Some(1),
        ..FaultRule::default()
    });
    let (mut first, url) = common::spawn_broker_binary(configured(&ledger, &sim.base_url()), None);
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
        common::spawn_broker_binary(configured(&ledger, &sim.base_url()), None);
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
