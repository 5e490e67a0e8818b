//! A huge upstream body does not grow the broker's memory (hardening, item 3). Its own test
//! binary: it reads the peak resident memory of the process, which other tests would disturb.

mod common;

use common::{CLIENT_TOKEN, TestEnv};
use giroident_broker::sim::{FaultRule, SimConfig};
use serde_json::json;

/// `VmHWM` (peak resident memory) of this process, in KiB.
fn peak_rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("/proc/self/status");
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmHWM:"))
        .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmHWM")
}

#[tokio::test]
async fn four_sessions_meeting_256_mib_error_bodies_leave_memory_near_its_baseline() {
    let env = TestEnv::with(SimConfig::default(), |s| {
        s.resilience.base_backoff_ms = 10;
        s.resilience.max_backoff_ms = 50;
    })
    .await;
    common::expect_created(env.start_session(json!({"flow": "access"})).await).await;
    env.sim.add_fault(FaultRule {
        endpoint: CLIENT_TOKEN.to_owned(),
        status: Some(500),
        pad_bytes: Some(256 * 1024 * 1024),
        ..FaultRule::default()
    });
    // A fresh client token is needed: drop the cached one.
    env.sim.revoke_all_tokens();
    let baseline = peak_rss_kib();
    let sessions = (0..4).map(|_| env.start_session(json!({"flow": "access"})));
    for response in futures_util::future::join_all(sessions).await {
        common::expect_problem(response, 502, "UPSTREAM_ERROR").await;
    }
    let grown_mib = peak_rss_kib().saturating_sub(baseline) / 1024;
    assert!(
        grown_mib < 32,
        "peak resident memory grew by {grown_mib} MiB"
    );
    env.stop().await;
}
