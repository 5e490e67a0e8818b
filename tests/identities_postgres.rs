//! Managed identities on PostgreSQL, where several replicas share one ledger: the real broker
//! (two of them), the real simulator and a real PostgreSQL server started by the test.

mod common;

use std::time::Duration;

use common::{CREATE_USER, DELETE_USER, TestEnv, pg};
use giroident_broker::config::Settings;
use giroident_broker::sim::{self, SimConfig};
use giroident_broker::startup::Application;
use serde_json::json;
use tokio::sync::oneshot;

fn quick(s: &mut Settings) {
    common::quick_ledger(s, 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_concurrent_first_sessions_on_postgresql_create_one_user() {
    let db = pg::database().await;
    let sim = sim::start(SimConfig::default()).await.expect("simulator");
    let mut settings = common::settings_with_ledger(&sim, &common::ledger_at(&db.url()));
    quick(&mut settings);
    let env = TestEnv::with_settings(sim, &settings).await;
    let sessions = (0..50)
        .map(|_| env.start_session(json!({"flow": "access", "clientReference": "customer-pg"})));
    let mut users = std::collections::HashSet::new();
    for answer in futures_util::future::join_all(sessions).await {
        let body = common::expect_created(answer).await;
        users.insert(body["userId"].as_str().unwrap().to_owned());
    }
    assert_eq!(users.len(), 1);
    assert_eq!(env.all_calls(CREATE_USER), 1);
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_delete_each_due_identity_exactly_once() {
    let db = pg::database().await;
    let sim = sim::start(SimConfig::default()).await.expect("simulator");
    let mut settings = common::settings_with_ledger(&sim, &common::ledger_at(&db.url()));
    quick(&mut settings);
    settings.identities.retention_secs = 2;
    // A second replica on the same ledger and the same finAPI.
    let replica = Application::build(&settings).await.expect("replica starts");
    let (stop_replica, stopped) = oneshot::channel::<()>();
    let replica = tokio::spawn(replica.run_until_stopped(async {
        let _ = stopped.await;
    }));
    let env = TestEnv::with_settings(sim, &settings).await;
    const IDENTITIES: usize = 40;
    let sessions = (0..IDENTITIES).map(|n| {
        env.start_session(json!({"flow": "access", "clientReference": format!("customer-{n}")}))
    });
    for answer in futures_util::future::join_all(sessions).await {
        common::expect_created(answer).await;
    }
    let all_deleted = common::eventually(Duration::from_secs(20), || {
        env.calls(DELETE_USER, "200") == IDENTITIES as u64
    })
    .await;
    // Let both reapers run a few more rounds: nothing is deleted twice.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let _ = stop_replica.send(());
    replica.await.expect("replica stops");
    assert!(all_deleted, "not all deleted: {:?}", env.sim.stats());
    assert_eq!(
        env.all_calls(DELETE_USER),
        IDENTITIES as u64,
        "{:?}",
        env.sim.stats()
    );
    env.stop().await;
}

/// As `concurrent_deletions_of_one_identity_delete_it_once` in `tests/identities.rs`, where
/// the claim is PostgreSQL's row lock and re-check rather than SQLite's one writer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_deletions_of_one_identity_on_postgresql_delete_it_once() {
    let db = pg::database().await;
    let sim = sim::start(SimConfig::default()).await.expect("simulator");
    let mut settings = common::settings_with_ledger(&sim, &common::ledger_at(&db.url()));
    quick(&mut settings);
    let env = TestEnv::with_settings(sim, &settings).await;
    common::concurrent_deletes_delete_once(&env, "race-1").await;
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ledger_that_goes_away_stops_the_access_flow_before_finapi_but_not_standalone() {
    let mut server = pg::start().await;
    let sim = sim::start(SimConfig::default()).await.expect("simulator");
    let mut settings = common::settings_with_ledger(&sim, &common::ledger_at(&server.url()));
    quick(&mut settings);
    // Room for the ledger's 2 s connection timeout on a loaded machine: the answer must be the
    // ledger's 503, not the request's own timeout.
    settings.server.request_timeout_secs = 20;
    let env = TestEnv::with_settings(sim, &settings).await;
    common::expect_created(env.start_session(json!({"flow": "access"})).await).await;
    server.stop();
    env.sim.reset_stats();

    let refused = env
        .start_session(json!({"flow": "access", "clientReference": "customer-x"}))
        .await;
    common::expect_problem(refused, 503, "STORE_UNAVAILABLE").await;
    let refused = env.start_session(json!({"flow": "access"})).await;
    common::expect_problem(refused, 503, "STORE_UNAVAILABLE").await;
    let shown = env
        .http
        .get(format!("{}/identities/customer-x", env.broker_url))
        .send()
        .await
        .unwrap();
    common::expect_problem(shown, 503, "STORE_UNAVAILABLE").await;
    // No finAPI user without its record: finAPI heard nothing of these sessions.
    assert_eq!(env.all_calls(CREATE_USER), 0, "{:?}", env.sim.stats());
    assert_eq!(env.all_calls(common::CLIENT_TOKEN), 0);

    common::expect_created(
        env.start_session(json!({"flow": "standalone", "clientReference": "c-1"}))
            .await,
    )
    .await;
    let ready: serde_json::Value = env
        .http
        .get(format!("{}/readyz", env.broker_url))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(ready["identityStore"], "unavailable");
    let metrics = env.metrics_text().await;
    assert!(metrics.contains("broker_identity_store_up 0"), "{metrics}");
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_whose_ledger_cannot_be_reached_does_not_start() {
    let mut server = pg::start().await;
    let url = server.url();
    server.stop();
    let sim = sim::start(SimConfig::default()).await.expect("simulator");
    let settings = common::settings_with_ledger(&sim, &common::ledger_at(&url));
    let err = match Application::build(&settings).await {
        Ok(_) => panic!("the broker started without its ledger"),
        Err(err) => giroident_broker::telemetry::cause_chain(&err),
    };
    assert!(err.contains("identity ledger"), "{err}");
}
