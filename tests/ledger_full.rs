//! A ledger whose disk is full: every write fails (`SQLITE_FULL`, or `EFBIG` past the limit)
//! while reads still work. The broker binary runs under a file-size limit (`ulimit -f`, with
//! `SIGXFSZ` ignored so that a write past it fails instead of killing the process): no root,
//! no filesystem of its own, and the same failure a full disk gives SQLite.

mod common;

use std::time::{Duration, Instant};

use common::{CREATE_USER, TEST_API_KEY};
use giroident_broker::sim::{self, SimConfig};
use serde_json::{Value, json};

/// `command` run by `/bin/sh` with files limited to `blocks` blocks (512 bytes in POSIX
/// shells, 1024 in bash) and `SIGXFSZ` ignored (an ignored signal stays ignored across `exec`).
fn under_file_size_limit(command: &std::process::Command, blocks: u64) -> std::process::Command {
    let mut limited = std::process::Command::new("/bin/sh");
    limited
        .arg("-c")
        .arg(format!(
            r#"trap '' XFSZ; ulimit -f {blocks} && exec "$0" "$@""#
        ))
        .arg(command.get_program())
        .args(command.get_args())
        .env_clear();
    for (key, value) in command.get_envs() {
        if let Some(value) = value {
            limited.env(key, value);
        }
    }
    limited
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_ledger_refuses_sessions_before_finapi_and_readiness_says_so() {
    let ledger = common::sqlite_ledger();
    // The schema first, so that the broker starts on a file that only its records make grow.
    common::ledger_store(&ledger).await.close().await;
    let path = common::sqlite_path(&ledger);
    let size = std::fs::metadata(&path).expect("the ledger file").len();
    // Room for the file as it is and SQLite's 32 KiB shared-memory index, little more.
    let blocks = size.max(32 * 1024).div_ceil(512) + 16;
    let sim = sim::start(SimConfig::default()).await.expect("simulator");
    let mut broker = common::broker_command_on(&ledger, &sim.base_url());
    broker.env(
        "GIROIDENT_BROKER_AUTH__CALLERS",
        common::test_caller("full", r#"["access"]"#),
    );
    let command = under_file_size_limit(&broker, blocks);
    let (mut broker, url) = common::spawn_broker_binary(command, None);
    let http = common::client_with_key(TEST_API_KEY);
    let session = |n: u32| {
        http.post(format!("{url}/kyc-sessions"))
            .json(&json!({"flow": "access", "clientReference": format!("customer-full-{n}")}))
            .send()
    };
    let readiness = || async {
        let answer = http
            .get(format!("{url}/readyz"))
            .send()
            .await
            .expect("readyz answers");
        let status = answer.status().as_u16();
        let body: Value = answer.json().await.expect("readyz JSON");
        (status, body)
    };
    let (status, ready) = readiness().await;
    assert_eq!(
        (status, &ready["identityStore"]),
        (200, &json!("up")),
        "{ready}"
    );
    // Sessions until the ledger can take no more.
    let started = Instant::now();
    let mut n = 0;
    loop {
        n += 1;
        let answer = session(n).await.expect("the broker answers");
        if answer.status() == 503 {
            common::expect_problem(answer, 503, "STORE_UNAVAILABLE").await;
            break;
        }
        common::expect_created(answer).await;
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "{n} sessions and the ledger is not full"
        );
    }
    assert!(
        broker.try_wait().expect("status").is_none(),
        "the broker lives"
    );
    // Full: no session gets as far as finAPI, and readiness says so (still 200).
    let (status, ready) = readiness().await;
    assert_eq!(status, 200, "{ready}");
    assert_eq!(ready["identityStore"], "unavailable", "{ready}");
    let users = || {
        sim.stats()
            .get(CREATE_USER)
            .map_or(0, |s| s.values().sum::<u64>())
    };
    let users_before = users();
    for m in n + 1..n + 4 {
        let refused = session(m).await.expect("the broker answers");
        common::expect_problem(refused, 503, "STORE_UNAVAILABLE").await;
    }
    let users_after = users();
    assert_eq!(
        users_after, users_before,
        "no finAPI user without a durable intent"
    );
    let (_, ready) = readiness().await;
    assert_eq!(ready["identityStore"], "unavailable", "{ready}");
    let _ = broker.kill();
    let _ = broker.wait();
}
