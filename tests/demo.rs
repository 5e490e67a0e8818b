//! The `demo` command honours `--config` and `GIROIDENT_BROKER_*` over its own settings,
//! observed on the real binary.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};

use tokio::task::JoinSet;

const API_KEY: &str = "demo-test-key-0123456789";

/// A running `giroident-broker demo`, killed when dropped.
struct Demo {
    child: Child,
    broker_url: String,
    /// What the demo printed at start, up to "Press Ctrl-C to stop.".
    printed: Vec<String>,
}

impl Drop for Demo {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The binary, with its temporary files (the simulator's authority, the fresh ledger) in
/// Cargo's directory for test files: these tests end most demos with SIGKILL, which leaves
/// them behind, and the system's temporary directory would collect them run after run.
/// Its environment is cleared, as each test sets what it needs.
fn demo_command() -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_giroident-broker"));
    command
        .env_clear()
        .env("TMPDIR", env!("CARGO_TARGET_TMPDIR"));
    command
}

/// Starts the demo on a free port and waits for it to print its address.
fn start_demo(args: &[&str], env: &[(&str, &str)]) -> Demo {
    let mut child = demo_command()
        .args(["demo", "--listen", "127.0.0.1:0", "--api-key", API_KEY])
        .args(args)
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("the binary runs");
    let stdout = child.stdout.take().expect("stdout is piped");
    let mut demo = Demo {
        child,
        broker_url: String::new(),
        printed: Vec::new(),
    };
    let mut lines = BufReader::new(stdout).lines();
    for line in lines.by_ref() {
        let line = line.expect("stdout is text");
        if let Some(url) = line.trim().strip_prefix("broker:") {
            demo.broker_url = url.trim().to_owned();
        }
        if line.trim().starts_with("API key:") {
            assert!(line.contains(API_KEY), "{line}");
        }
        let last = line.starts_with("Press Ctrl-C");
        demo.printed.push(line);
        if last {
            break;
        }
    }
    // The rest is read, so that the demo never writes into a closed pipe.
    std::thread::spawn(move || lines.for_each(drop));
    assert!(
        !demo.broker_url.is_empty(),
        "the demo printed no broker address: {:?}, {:?}",
        demo.printed,
        demo.child.try_wait()
    );
    demo
}

/// Sends `n` requests at once that pass the rate limit but need nothing from finAPI (the body
/// lacks `clientReference`: 422), and returns how many were rate limited.
async fn rate_limited_of(demo: &Demo, n: usize) -> usize {
    let http = common::client_with_key(API_KEY);
    let mut requests = JoinSet::new();
    for _ in 0..n {
        let request = http
            .post(format!("{}/kyc-sessions", demo.broker_url))
            .json(&serde_json::json!({"flow": "standalone"}));
        requests.spawn(async move { request.send().await.map(|r| r.status().as_u16()) });
    }
    let mut limited = 0;
    while let Some(status) = requests.join_next().await {
        match status.expect("the task ran").expect("the demo answers") {
            429 => limited += 1,
            422 => {}
            other => panic!("unexpected status {other}"),
        }
    }
    limited
}

#[tokio::test]
async fn demo_takes_limits_from_its_config_file_and_the_environment() {
    let dir = std::env::temp_dir().join(format!("gib-demo-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("demo.toml");
    std::fs::write(&file, "[limits]\ncaller_burst = 150\n").unwrap();
    let demo = start_demo(
        &["--config", file.to_str().unwrap()],
        &[("GIROIDENT_BROKER_LIMITS__CALLER_RATE_PER_SEC", "1")],
    );
    // The file's burst: 150 at once pass (the built-in 40, refilled at 20 per second, would
    // need seconds for that).
    assert_eq!(rate_limited_of(&demo, 150).await, 0);
    // The environment's rate: the bucket refills by one a second, so it is empty now.
    assert!(rate_limited_of(&demo, 10).await >= 5);
    drop(demo);
    std::fs::remove_dir_all(dir).unwrap();
}

#[tokio::test]
async fn demo_without_configuration_keeps_the_default_burst() {
    let demo = start_demo(&[], &[]);
    assert!(rate_limited_of(&demo, 100).await > 0);
}

/// Runs a demo that must refuse to start and returns its output; panics (after killing it)
/// if it printed its "API key:" line, i.e. started despite `what`.
fn refused_demo(mut command: std::process::Command, what: &str) -> std::process::Output {
    let mut child = command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("the binary runs");
    let stdout = child.stdout.take().expect("stdout is piped");
    let started = BufReader::new(stdout)
        .lines()
        .map_while(Result::ok)
        .any(|line| line.contains("API key:"));
    if started {
        let _ = child.kill();
        let _ = child.wait();
        panic!("the demo started despite {what}");
    }
    child.wait_with_output().expect("the demo ends")
}

/// `--api-key ''` started a demo whose printed key no request can carry (an empty
/// `X-Api-Key` is a missing one): every curl it printed answered `401`. A key must be what a
/// header carries unchanged: visible ASCII.
#[test]
fn demo_refuses_an_api_key_no_client_can_send() {
    for key in ["", " ", "two words", "tab\there", "schlüssel"] {
        let mut command = demo_command();
        command.args(["demo", "--listen", "127.0.0.1:0", "--api-key", key]);
        let out = refused_demo(command, &format!("--api-key {key:?}"));
        assert_eq!(out.status.code(), Some(2), "{key:?}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains("--api-key"), "{key:?}: {stderr}");
    }
}

/// Callers from a file or variable replace the demo caller (README, Configuration), yet the
/// demo still printed its own key as "caller \"demo\", both flows" in every curl, each of
/// which then answered `401 INVALID_API_KEY`. It says so instead, and prints no key that
/// does not work.
#[tokio::test]
async fn demo_with_configured_callers_prints_no_key_that_does_not_work() {
    let mut child = demo_command()
        .args(["demo", "--listen", "127.0.0.1:0", "--api-key", API_KEY])
        .env(
            "GIROIDENT_BROKER_AUTH__CALLERS",
            r#"[{name = "mine", key_env = "MY_KEY", flows = ["access"]}]"#,
        )
        .env("MY_KEY", "my-own-key-0123456789")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("the binary runs");
    let stdout = child.stdout.take().expect("stdout is piped");
    let mut printed = Vec::new();
    for line in BufReader::new(stdout).lines().map_while(Result::ok) {
        let last = line.starts_with("Press Ctrl-C");
        printed.push(line);
        if last {
            break;
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    let text = printed.join("\n");
    assert!(
        text.contains("Press Ctrl-C"),
        "the demo did not start: {text}"
    );
    assert!(!text.contains(API_KEY), "{text}");
    assert!(!text.contains("caller \"demo\""), "{text}");
    let key_line = printed
        .iter()
        .find(|l| l.trim().starts_with("API key:"))
        .expect("an API key line");
    assert!(key_line.contains("auth.callers"), "{key_line}");
    assert!(text.contains("X-Api-Key: $API_KEY"), "{text}");
}

#[test]
fn demo_reports_a_bad_configuration_with_its_key_and_exits_2() {
    let mut command = demo_command();
    command
        .args(["demo", "--listen", "127.0.0.1:0"])
        .env("GIROIDENT_BROKER_LIMITS__CALLER_BURST", "many");
    let out = refused_demo(command, "GIROIDENT_BROKER_LIMITS__CALLER_BURST=many");
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("limits.caller_burst"), "{stderr}");
}

#[test]
fn demo_logs_as_its_configuration_says() {
    let mut child = demo_command()
        .args(["demo", "--listen", "127.0.0.1:0", "--api-key", API_KEY])
        .env("GIROIDENT_BROKER_LOG__FORMAT", "json")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("the binary runs");
    let stderr = child.stderr.take().expect("stderr is piped");
    let (line_tx, line_rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if line_tx.send(line).is_err() {
                break;
            }
        }
    });
    let listening = loop {
        let Ok(line) = line_rx.recv_timeout(std::time::Duration::from_secs(30)) else {
            break None;
        };
        if line.contains("broker listening") {
            break Some(line);
        }
    };
    let _ = child.kill();
    let _ = child.wait();
    let line = listening.expect("the demo logged that it listens");
    let log: serde_json::Value =
        serde_json::from_str(&line).unwrap_or_else(|_| panic!("not a JSON log line: {line}"));
    assert_eq!(log["level"], "INFO", "{line}");
}

/// The demo's simulator serves HTTPS from a fresh authority whose certificate the demo prints
/// (and trusts through `finapi.ca_file`): a session goes through, and the printed `--cacert`
/// curl line reaches the simulator.
#[tokio::test]
async fn demo_reaches_its_simulator_over_verified_https() {
    let demo = start_demo(&[], &[]);
    let value_of = |label: &str| {
        demo.printed
            .iter()
            .find_map(|line| line.trim().strip_prefix(label))
            .and_then(|rest| rest.split_whitespace().next())
            .unwrap_or_else(|| panic!("no {label} line in {:?}", demo.printed))
            .to_owned()
    };
    let sim_url = value_of("simulator:");
    let ca_file = value_of("CA:");
    assert!(sim_url.starts_with("https://127.0.0.1:"), "{sim_url}");
    let sim_curl = demo
        .printed
        .iter()
        .find(|line| line.contains("/api/v2/users"))
        .expect("a curl line for the simulator");
    assert!(
        sim_curl.contains(&format!(
            "curl -s --cacert {ca_file} {sim_url}/api/v2/users"
        )),
        "{sim_curl}"
    );

    let http = common::client_with_key(API_KEY);
    let session = http
        .post(format!("{}/kyc-sessions", demo.broker_url))
        .json(&serde_json::json!({"flow": "standalone", "clientReference": "customer-4711"}))
        .send()
        .await
        .expect("the demo answers");
    assert_eq!(session.status(), 201);

    let ca_pem = std::fs::read_to_string(&ca_file).expect("the printed CA file exists");
    let stats: serde_json::Value = common::client_trusting(API_KEY, &ca_pem)
        .get(format!("{sim_url}/__sim/stats"))
        .send()
        .await
        .expect("the simulator answers over HTTPS with the printed CA")
        .json()
        .await
        .expect("stats JSON");
    assert_eq!(stats["POST /api/v1/processes"]["201"], 1, "{stats}");
}
