//! A finAPI client secret rotated at finAPI (`changeClientCredentials`) while the broker runs:
//! once the secret file holds the new secret, the broker picks it up on the first
//! `401 invalid_client`, without a signal or a restart.

mod common;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::*;
use giroident_broker::config::DEFAULT_CLIENT;
use giroident_broker::sim::{DEMO_CLIENT_ID, DEMO_CLIENT_SECRET, SimConfig};
use serde_json::json;

/// A fresh file holding `secret` and a newline, as Kubernetes and compose mount it.
fn secret_file(secret: &str) -> PathBuf {
    let path = std::env::temp_dir().join(format!(
        "giroident-broker-client-secret-{}",
        uuid::Uuid::new_v4().simple()
    ));
    rewrite(&path, secret);
    path
}

/// Replaces the file's content in one step (a rename), as Kubernetes swaps a mounted Secret,
/// so that no reader sees it half written.
fn rewrite(path: &Path, secret: &str) {
    let next = path.with_extension("next");
    std::fs::write(&next, format!("{secret}\n")).expect("secret file written");
    std::fs::rename(&next, path).expect("secret file replaced");
}

/// A broker whose client secret comes from `file`.
async fn broker_reading(file: &Path) -> TestEnv {
    TestEnv::with(SimConfig::default(), |s| {
        s.finapi.client_secret_file = Some(file.to_path_buf());
    })
    .await
}

fn rereads(env: &TestEnv) -> u64 {
    env.flows
        .client_secret(DEFAULT_CLIENT)
        .expect("the default client")
        .rereads()
}

#[tokio::test]
async fn a_rotation_finapi_already_made_is_picked_up_from_the_file_after_one_reread() {
    let file = secret_file(DEMO_CLIENT_SECRET);
    let env = broker_reading(&file).await;
    env.access_session().await;
    assert!(
        env.sim
            .change_client_secret(DEMO_CLIENT_ID, "rotated-secret-1")
    );

    // The file still holds the old secret: the refusal stands, as before (502).
    let refused = env.start_session(json!({"flow": "access"})).await;
    expect_problem(refused, 502, "UPSTREAM_REJECTED").await;
    assert_eq!(rereads(&env), 1);

    rewrite(&file, "rotated-secret-1");
    env.access_session().await;
    assert_eq!(rereads(&env), 2, "one more read found the new secret");
    // The Process Controller, which takes the secret in its body, gets the new one at once.
    env.standalone_session("after-rotation").await;
    env.access_session().await;
    assert_eq!(rereads(&env), 2);
    assert!(
        env.metrics_text()
            .await
            .lines()
            .any(|l| l.starts_with("broker_finapi_secret_rereads_total")
                && l.contains("finapi_client=\"default\"")
                && l.contains("outcome=\"changed\"")),
        "the re-read is counted"
    );
    env.stop().await;
    let _ = std::fs::remove_file(file);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_refusals_read_the_secret_file_once() {
    let file = secret_file(DEMO_CLIENT_SECRET);
    let env = broker_reading(&file).await;
    assert!(
        env.sim
            .change_client_secret(DEMO_CLIENT_ID, "rotated-secret-2")
    );
    rewrite(&file, "rotated-secret-2");
    // Each standalone session sends the secret itself: all are refused at once.
    let sessions = (0..16).map(|n| {
        env.start_session(json!({"flow": "standalone", "clientReference": format!("burst-{n}")}))
    });
    for response in futures_util::future::join_all(sessions).await {
        expect_created(response).await;
    }
    assert_eq!(rereads(&env), 1);
    env.stop().await;
    let _ = std::fs::remove_file(file);
}

/// Loops of sessions, both flows, until `stop`; each returns (started, status) of its sessions.
fn session_loops(
    env: &Arc<TestEnv>,
    stop: &Arc<AtomicBool>,
) -> Vec<tokio::task::JoinHandle<Vec<(Instant, u16)>>> {
    (0..4)
        .map(|n| {
            let (env, stop) = (env.clone(), stop.clone());
            tokio::spawn(async move {
                let mut results = Vec::new();
                let mut i = 0;
                while !stop.load(Ordering::Relaxed) {
                    let body = if (n + i) % 2 == 0 {
                        json!({"flow": "access"})
                    } else {
                        json!({"flow": "standalone", "clientReference": format!("loop-{n}-{i}")})
                    };
                    let started = Instant::now();
                    let status = env.start_session(body).await.status().as_u16();
                    results.push((started, status));
                    i += 1;
                }
                results
            })
        })
        .collect()
}

/// Sessions finished so far, by the calls that end them.
fn sessions_so_far(env: &TestEnv) -> u64 {
    env.all_calls(CREATE_USER) + env.all_calls(EXCHANGE)
}

/// Calls finAPI refused for the client credentials so far.
fn refusals(env: &TestEnv) -> u64 {
    env.calls(CLIENT_TOKEN, "401")
        + env.calls(PASSWORD_TOKEN, "401")
        + env.calls(CREATE_PROCESS, "401")
}

/// Lets `count` more sessions finish.
async fn more_sessions(env: &TestEnv, count: u64) {
    let target = sessions_so_far(env) + count;
    assert!(eventually(Duration::from_secs(20), || sessions_so_far(env) >= target).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_running_through_a_rotation_all_succeed_once_the_new_file_is_in_place() {
    let file = secret_file(DEMO_CLIENT_SECRET);
    let env = Arc::new(broker_reading(&file).await);
    let stop = Arc::new(AtomicBool::new(false));
    let loops = session_loops(&env, &stop);
    more_sessions(&env, 20).await;
    assert!(
        env.sim
            .change_client_secret(DEMO_CLIENT_ID, "rotated-secret-3")
    );
    // finAPI refuses the old secret for a while, as it does until the operator updates the
    // secret; then the new file arrives.
    let refused_before = refusals(&env);
    assert!(eventually(Duration::from_secs(10), || refusals(&env) > refused_before).await);
    rewrite(&file, "rotated-secret-3");
    let written = Instant::now();
    more_sessions(&env, 40).await;
    stop.store(true, Ordering::Relaxed);
    let mut after_file = 0;
    for handle in loops {
        for (started, status) in handle.await.unwrap() {
            if started > written {
                after_file += 1;
                assert_eq!(status, 201, "a session started after the new file failed");
            }
        }
    }
    assert!(
        after_file >= 20,
        "only {after_file} sessions after the file"
    );
    // The same broker served throughout: it read the file again, no restart did.
    assert!(rereads(&env) >= 1);
    let _ = std::fs::remove_file(file);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_file_rewritten_before_the_rotation_no_session_fails() {
    let file = secret_file(DEMO_CLIENT_SECRET);
    let env = Arc::new(broker_reading(&file).await);
    let stop = Arc::new(AtomicBool::new(false));
    let loops = session_loops(&env, &stop);
    more_sessions(&env, 20).await;
    // The broker keeps the secret finAPI still takes...
    rewrite(&file, "rotated-secret-4");
    more_sessions(&env, 20).await;
    assert_eq!(rereads(&env), 0);
    // ...until finAPI refuses it.
    assert!(
        env.sim
            .change_client_secret(DEMO_CLIENT_ID, "rotated-secret-4")
    );
    more_sessions(&env, 40).await;
    stop.store(true, Ordering::Relaxed);
    for handle in loops {
        for (_, status) in handle.await.unwrap() {
            assert_eq!(status, 201, "a session failed");
        }
    }
    assert!(rereads(&env) >= 1);
    let _ = std::fs::remove_file(file);
}
