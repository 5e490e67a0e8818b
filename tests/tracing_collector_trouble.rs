//! A collector that hangs, then one that is down: sessions still succeed promptly, and the
//! spans that cannot be queued are dropped and counted in `broker_trace_spans_dropped_total`.
//! (A binary of its own: the exporting subscriber is global to the process.)

mod common;

use std::time::{Duration, Instant};

use common::*;

/// Generous: a session against the simulator takes milliseconds; an export waiting on the
/// collector would take the export timeout (60 s here).
const PROMPT: Duration = Duration::from_secs(10);

fn dropped(metrics: &str) -> u64 {
    metrics
        .lines()
        .filter(|l| l.starts_with("broker_trace_spans_dropped_total{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64
}

async fn session_is_prompt(env: &TestEnv, n: usize) {
    let started = Instant::now();
    env.standalone_session(&format!("trouble-{n}")).await;
    assert!(
        started.elapsed() < PROMPT,
        "session {n} took {:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn a_hanging_or_absent_collector_never_holds_a_session() {
    // The collector accepts connections and never answers.
    let collector = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = collector.local_addr().unwrap();
    let (stop_tx, stop_rx) = std::sync::mpsc::channel::<()>();
    let hang = std::thread::spawn(move || {
        collector.set_nonblocking(true).unwrap();
        let mut held = Vec::new();
        while stop_rx.try_recv().is_err() {
            match collector.accept() {
                Ok((conn, _)) => held.push(conn),
                Err(_) => std::thread::sleep(Duration::from_millis(5)),
            }
        }
        // Dropping the listener and the connections: from now on the collector is down.
    });
    let settings = common::tracing_settings(&format!("http://{addr}"), "always_on", "", 60000, 8);
    let (_logs, guard) = CapturedLogs::install_exporting("warn", &settings);

    let env = TestEnv::start().await;
    // Hanging: the first batch waits on the collector, the queue fills, spans are dropped.
    let mut n = 0;
    while dropped(&env.metrics_text().await) == 0 {
        session_is_prompt(&env, n).await;
        n += 1;
        assert!(n < 500, "no span was ever dropped");
    }

    // Down: connections are refused; sessions go on as before.
    stop_tx.send(()).unwrap();
    hang.join().unwrap();
    for _ in 0..20 {
        session_is_prompt(&env, n).await;
        n += 1;
    }
    assert!(dropped(&env.metrics_text().await) > 0);
    env.stop().await;
    // Shutting the export down is bounded too.
    let started = Instant::now();
    drop(guard);
    assert!(started.elapsed() < PROMPT);
}
