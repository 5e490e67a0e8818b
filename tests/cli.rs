//! The command line: configuration errors are reported with their keys and exit code 2.

use std::process::Command;

fn broker(args: &[&str], env: &[(&str, &str)]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_giroident-broker"))
        .args(args)
        .env_clear()
        .envs(env.iter().copied())
        .output()
        .expect("the binary runs")
}

const VALID: &[(&str, &str)] = &[
    ("GIROIDENT_BROKER_FINAPI__CLIENT_ID", "client"),
    ("GIROIDENT_BROKER_FINAPI__CLIENT_SECRET", "cli-test-secret"),
    (
        "GIROIDENT_BROKER_IDENTITIES__PASSWORD_KEY",
        "cli-test-password-key-0123456789abcdef",
    ),
    ("GIROIDENT_BROKER_AUTH__DISABLED", "true"),
];

#[test]
fn check_config_accepts_a_valid_configuration() {
    let out = broker(&["check-config"], VALID);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The binary allocates with mimalloc (src/main.rs, issue 15): `MIMALLOC_VERBOSE`, which only
/// mimalloc reads, makes it report its options on stderr when the process starts.
#[test]
fn the_binary_allocates_with_mimalloc() {
    let mut env = VALID.to_vec();
    env.push(("MIMALLOC_VERBOSE", "1"));
    let out = broker(&["check-config"], &env);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.contains("mimalloc: "),
        "no word from mimalloc: {stderr}"
    );
}

#[test]
fn check_config_reports_every_problem_with_its_key_and_exits_2() {
    let mut env = VALID.to_vec();
    env.retain(|(k, _)| !k.ends_with("CLIENT_ID"));
    env.push(("GIROIDENT_BROKER_SERVER__LISTEN", "nowhere"));
    env.push(("GIROIDENT_BROKER_FLOWS__DEFAULT_FLOW", "video"));
    let out = broker(&["check-config"], &env);
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    for key in ["finapi.client_id", "server.listen", "flows.default_flow"] {
        assert!(stderr.contains(key), "{key} missing from {stderr}");
    }
    assert!(!stderr.contains("cli-test-secret"), "{stderr}");
}

/// A ledger URL the database driver cannot read was accepted by `check-config` and refused
/// only by `serve` (exit 1, after the start had begun): both now refuse it as a configuration
/// problem naming the key, never its password.
#[test]
fn check_config_refuses_a_database_url_the_ledger_cannot_read() {
    for url in [
        "postgres://ledger:cli-db-password@[not-an-address/ledger",
        "postgres://ledger:cli-db-password@127.0.0.1:5432/ledger?sslmode=sometimes",
        "postgresql://ledger:cli-db-password@127.0.0.1:notaport/ledger",
        "sqlite:///var/lib/giroident-broker/identities.db?mode=bogus",
    ] {
        let mut env = VALID.to_vec();
        env.push(("GIROIDENT_BROKER_IDENTITIES__DATABASE_URL", url));
        for command in ["check-config", "serve"] {
            let out = broker(&[command], &env);
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert_eq!(out.status.code(), Some(2), "{command} {url}: {stderr}");
            assert!(
                stderr.contains("identities.database_url:"),
                "{command} {url}: {stderr}"
            );
            assert!(!stderr.contains("cli-db-password"), "{stderr}");
        }
    }
}

/// SQLite creates its file but not the file's directory; the broker said only "unable to open
/// database file", twice, which sends a newcomer (the default path is under /var/lib) looking
/// at permissions and URLs instead of at the missing directory or volume.
#[test]
fn serve_says_when_the_sqlite_ledgers_directory_does_not_exist() {
    let missing = std::path::Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("no-such-dir-{}", std::process::id()))
        .join("identities.db");
    let url = format!("sqlite://{}", missing.display());
    let mut env = VALID.to_vec();
    env.push(("GIROIDENT_BROKER_IDENTITIES__DATABASE_URL", &url));
    env.push(("GIROIDENT_BROKER_SERVER__LISTEN", "127.0.0.1:0"));
    env.push(("GIROIDENT_BROKER_ADMIN__LISTEN", "127.0.0.1:0"));
    let out = broker(&["serve"], &env);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("identities.database_url"), "{stderr}");
    assert!(
        stderr.contains("the directory of its SQLite file does not exist"),
        "{stderr}"
    );
    assert!(!missing.parent().unwrap().exists());
}

/// `server.listen` and `admin.listen` on one port passed `check-config`, and `serve` then
/// failed with "Address already in use", which sends an operator looking for another process
/// when the broker's own admin listener holds the port.
#[test]
fn check_config_refuses_the_admin_listener_on_the_brokers_port() {
    for (server, admin) in [
        ("127.0.0.1:18090", "127.0.0.1:18090"),
        ("0.0.0.0:18090", "127.0.0.1:18090"),
        ("127.0.0.1:18090", "0.0.0.0:18090"),
    ] {
        let mut env = VALID.to_vec();
        env.push(("GIROIDENT_BROKER_SERVER__LISTEN", server));
        env.push(("GIROIDENT_BROKER_ADMIN__LISTEN", admin));
        let out = broker(&["check-config"], &env);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{server} {admin}: {stderr}");
        assert!(stderr.contains("admin.listen"), "{stderr}");
    }
    // Port 0 (any free port) twice, and one port on two different addresses, are fine.
    for (server, admin) in [
        ("127.0.0.1:0", "127.0.0.1:0"),
        ("127.0.0.1:18090", "127.0.0.2:18090"),
    ] {
        let mut env = VALID.to_vec();
        env.push(("GIROIDENT_BROKER_SERVER__LISTEN", server));
        env.push(("GIROIDENT_BROKER_ADMIN__LISTEN", admin));
        let out = broker(&["check-config"], &env);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// `RUST_LOG` wins over `log.filter`, but a value that does not parse was dropped without a
/// word (the broker logged at `log.filter`), while the same mistake in `log.filter` is a
/// configuration error: both are now.
#[test]
fn check_config_refuses_a_rust_log_that_does_not_parse() {
    for value in ["[[[", "giroident_broker=loud"] {
        let mut env = VALID.to_vec();
        env.push(("RUST_LOG", value));
        let out = broker(&["check-config"], &env);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{value}: {stderr}");
        assert!(stderr.contains("RUST_LOG: not a valid filter"), "{stderr}");
    }
}

/// An empty `RUST_LOG` (a compose file's `RUST_LOG=${RUST_LOG}` with the variable unset)
/// parsed as a filter that enables nothing: the broker ran without a single log line, its
/// errors included. Empty counts as unset, as `log.filter`'s documentation implies.
#[test]
fn an_empty_rust_log_leaves_the_configured_filter_in_force() {
    use std::io::{BufRead, BufReader};
    use std::process::Stdio;
    let db = std::path::Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("cli-empty-rust-log-{}.db", std::process::id()));
    let url = format!("sqlite://{}", db.display());
    let mut child = Command::new(env!("CARGO_BIN_EXE_giroident-broker"))
        .arg("serve")
        .env_clear()
        .envs(VALID.iter().copied())
        .env("RUST_LOG", "")
        .env("GIROIDENT_BROKER_SERVER__LISTEN", "127.0.0.1:0")
        .env("GIROIDENT_BROKER_ADMIN__LISTEN", "127.0.0.1:0")
        .env("GIROIDENT_BROKER_IDENTITIES__DATABASE_URL", &url)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("the binary runs");
    let stderr = child.stderr.take().expect("stderr is piped");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    // The start-up lines come within milliseconds; a silent broker sends none at all.
    let mut seen = Vec::new();
    let listening = loop {
        match rx.recv_timeout(std::time::Duration::from_secs(10)) {
            Ok(line) if line.contains("broker listening") => break true,
            Ok(line) => seen.push(line),
            Err(_) => break false,
        }
    };
    let _ = child.kill();
    let _ = child.wait();
    for suffix in ["", "-wal", "-shm"] {
        let _ = std::fs::remove_file(format!("{}{suffix}", db.display()));
    }
    assert!(listening, "no 'broker listening' line: {seen:?}");
}

#[test]
fn serve_refuses_to_start_on_a_bad_configuration() {
    let out = broker(&["serve"], &[]);
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("finapi.client_secret"), "{stderr}");
    assert!(stderr.contains("auth.callers"), "{stderr}");
}

#[test]
fn a_missing_config_file_is_reported() {
    let out = broker(
        &["check-config", "--config", "/nonexistent/broker.toml"],
        VALID,
    );
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--config"));
}

#[test]
fn check_config_names_each_finapi_client_problem_by_its_table_and_keeps_secrets_out() {
    let dir = std::env::temp_dir().join(format!("gib-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("clients.toml");
    std::fs::write(
        &path,
        r#"
[finapi.clients.live]
client_id = "live-id"
access_url = "http://live.example"
process_controller_url = "https://pc.live.example"

[finapi.clients.sandbox]
client_id = "sandbox-id"
access_url = "https://sandbox.example"
process_controller_url = "https://pc.sandbox.example"
"#,
    )
    .unwrap();
    let config = path.to_str().unwrap();
    let mut env = VALID.to_vec();
    env.push((
        "GIROIDENT_BROKER_FINAPI__CLIENTS__LIVE__CLIENT_SECRET",
        "cli-live-secret",
    ));
    let out = broker(&["check-config", "--config", config], &env);
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    for key in [
        "finapi.clients.live.access_url",
        "finapi.clients.sandbox.client_secret",
    ] {
        assert!(stderr.contains(key), "{key} missing from {stderr}");
    }
    assert!(
        !stderr.contains("finapi.clients.live.client_secret"),
        "{stderr}"
    );
    assert!(!stderr.contains("cli-live-secret") && !stderr.contains("cli-test-secret"));

    // Both clients complete, beside the single-client keys (the client `default`).
    env.push((
        "GIROIDENT_BROKER_FINAPI__CLIENTS__SANDBOX__CLIENT_SECRET",
        "cli-sandbox-secret",
    ));
    std::fs::write(
        &path,
        std::fs::read_to_string(&path)
            .unwrap()
            .replace("http://live", "https://live"),
    )
    .unwrap();
    let out = broker(&["check-config", "--config", config], &env);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    std::fs::remove_dir_all(dir).unwrap();
}

/// A fresh directory for one test's files.
fn scratch_dir(test: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("gib-cli-{test}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[test]
fn a_wrong_type_in_a_required_key_of_a_table_hides_no_other_problem() {
    let dir = scratch_dir("wrong-type");
    let path = dir.join("broker.toml");
    std::fs::write(
        &path,
        r#"
[server]
listen = "nowhere"

[finapi.clients.live]
client_id = 5
access_url = "https://live.example"
process_controller_url = "https://pc.live.example"

[finapi.clients.sandbox]
client_id = "sandbox-id"
access_url = "http://sandbox.example"
process_controller_url = "https://pc.sandbox.example"

[[auth.callers]]
name = "shop"
key_sha256 = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"
flows = "access"
finapi_clients = ["live", "nowhere"]
"#,
    )
    .unwrap();
    let mut env = VALID.to_vec();
    env.retain(|(k, _)| !k.contains("FINAPI__") && !k.contains("AUTH__"));
    env.push((
        "GIROIDENT_BROKER_FINAPI__CLIENTS__LIVE__CLIENT_SECRET",
        "cli-live-secret",
    ));
    let out = broker(&["check-config", "--config", path.to_str().unwrap()], &env);
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    for key in [
        "finapi.clients.live.client_id: must be a string",
        "auth.callers[0].flows: must be a sequence",
        "server.listen",
        "finapi.clients.sandbox.client_secret",
        "finapi.clients.sandbox.access_url",
        "auth.callers[0].finapi_clients: \"nowhere\"",
    ] {
        assert!(stderr.contains(key), "{key} missing from {stderr}");
    }
    assert_eq!(
        stderr.matches("finapi.clients.live.client_id").count(),
        1,
        "{stderr}"
    );
    assert!(!stderr.contains("cli-live-secret"), "{stderr}");
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn a_named_clients_ca_file_without_a_certificate_is_a_config_error_at_check_and_start() {
    let dir = scratch_dir("ca-file");
    let ca = dir.join("not-a-ca.pem");
    std::fs::write(&ca, "not a certificate\n").unwrap();
    let path = dir.join("broker.toml");
    std::fs::write(
        &path,
        format!(
            r#"
[finapi.clients.live]
client_id = "live-id"
access_url = "https://live.example"
process_controller_url = "https://pc.live.example"
ca_file = "{}"
"#,
            ca.display()
        ),
    )
    .unwrap();
    let mut env = VALID.to_vec();
    env.retain(|(k, _)| !k.contains("FINAPI__"));
    env.push((
        "GIROIDENT_BROKER_FINAPI__CLIENTS__LIVE__CLIENT_SECRET",
        "cli-live-secret",
    ));
    env.push(("GIROIDENT_BROKER_SERVER__LISTEN", "127.0.0.1:0"));
    env.push(("GIROIDENT_BROKER_ADMIN__LISTEN", "127.0.0.1:0"));
    let db = format!("sqlite://{}", dir.join("ledger.db").display());
    env.push(("GIROIDENT_BROKER_IDENTITIES__DATABASE_URL", &db));
    for command in ["check-config", "serve"] {
        let out = broker(&[command, "--config", path.to_str().unwrap()], &env);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{command}: {stderr}");
        assert!(
            stderr.contains("finapi.clients.live.ca_file") && stderr.contains("no PEM CERTIFICATE"),
            "{command}: {stderr}"
        );
    }
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn a_client_name_no_variable_can_reach_is_not_told_to_use_one() {
    let dir = scratch_dir("unreachable-name");
    let path = dir.join("broker.toml");
    std::fs::write(
        &path,
        r#"
[finapi.clients.Live]
client_id = "live-id"
access_url = "https://live.example"
process_controller_url = "https://pc.live.example"

[finapi.clients."eu.sandbox"]
client_id = "sandbox-id"
access_url = "https://sandbox.example"
process_controller_url = "https://pc.sandbox.example"
"#,
    )
    .unwrap();
    let mut env = VALID.to_vec();
    env.retain(|(k, _)| !k.contains("FINAPI__"));
    let out = broker(&["check-config", "--config", path.to_str().unwrap()], &env);
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    for key in [
        "finapi.clients.Live.client_secret",
        "finapi.clients.eu.sandbox.client_secret",
    ] {
        let line = stderr
            .lines()
            .find(|line| line.trim_start().starts_with(&format!("{key}:")))
            .unwrap_or_else(|| panic!("{key} missing from {stderr}"));
        assert!(
            line.contains(&format!("{key}_file")) && !line.contains("GIROIDENT_BROKER_"),
            "{line}"
        );
    }
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn finapi_ca_file_beside_client_tables_only_is_refused_rather_than_left_unused() {
    let dir = scratch_dir("unused-ca-file");
    // A usable bundle: the only problem is that no client would use it.
    let ca = dir.join("ca.pem");
    let authority = giroident_broker::sim::SimCa::generate().expect("an authority");
    std::fs::write(&ca, authority.cert_pem()).unwrap();
    let path = dir.join("broker.toml");
    std::fs::write(
        &path,
        format!(
            r#"
[finapi]
ca_file = {ca:?}

[finapi.clients.live]
client_id = "live-id"
access_url = "https://live.example"
process_controller_url = "https://pc.live.example"

[[auth.callers]]
name = "shop"
key_sha256 = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"
flows = ["standalone"]
finapi_clients = ["live"]
"#
        ),
    )
    .unwrap();
    let mut env = VALID.to_vec();
    env.retain(|(k, _)| !k.contains("FINAPI__") && !k.contains("AUTH__"));
    env.push((
        "GIROIDENT_BROKER_FINAPI__CLIENTS__LIVE__CLIENT_SECRET",
        "cli-live-secret",
    ));
    let out = broker(&["check-config", "--config", path.to_str().unwrap()], &env);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("finapi.ca_file") && stderr.contains("[finapi.clients.NAME]"),
        "{stderr}"
    );
    std::fs::remove_dir_all(dir).unwrap();
}

/// `sim --max-entries N` bounds each of the simulator's tables (README "The finAPI simulator"):
/// with 2, a third finAPI user is refused with `500 UNEXPECTED_ERROR` while the default bound
/// takes it; a bound of 0 is refused at start.
#[tokio::test]
async fn the_simulator_holds_at_most_max_entries_per_table() {
    let refused = broker(
        &["sim", "--listen", "127.0.0.1:0", "--max-entries", "0"],
        &[],
    );
    assert_eq!(refused.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("at least 1"),
        "{}",
        String::from_utf8_lossy(&refused.stderr)
    );
    // reqwest is built without a default TLS provider.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let http = reqwest::Client::new();
    for (bound, third) in [(Some("2"), 500), (None, 201)] {
        let (mut sim, addr) = spawn_plain_sim(bound);
        let token: serde_json::Value = http
            .post(format!("http://{addr}/api/v2/oauth/token"))
            .form(&[
                ("grant_type", "client_credentials"),
                ("client_id", giroident_broker::sim::DEMO_CLIENT_ID),
                ("client_secret", giroident_broker::sim::DEMO_CLIENT_SECRET),
            ])
            .send()
            .await
            .expect("token request")
            .json()
            .await
            .expect("token body");
        let bearer = token["access_token"].as_str().expect("access_token");
        let mut statuses = Vec::new();
        let mut last = serde_json::Value::Null;
        for n in 0..3 {
            let response = http
                .post(format!("http://{addr}/api/v2/users"))
                .bearer_auth(bearer)
                .json(
                    &serde_json::json!({"id": format!("max-entries-{n}"), "password": "secret-1"}),
                )
                .send()
                .await
                .expect("create user");
            statuses.push(response.status().as_u16());
            last = response.json().await.unwrap_or_default();
        }
        let _ = sim.kill();
        let _ = sim.wait();
        assert_eq!(statuses, [201, 201, third], "bound {bound:?}: {last}");
        if third == 500 {
            assert_eq!(last["errors"][0]["code"], "UNEXPECTED_ERROR", "{last}");
        }
    }
}

/// `giroident-broker sim` on plain HTTP and port 0, with `--max-entries` if given; the child and
/// its address, from its "finAPI simulator listening" log line.
fn spawn_plain_sim(max_entries: Option<&str>) -> (std::process::Child, String) {
    use std::io::{BufRead, BufReader};
    let mut command = Command::new(env!("CARGO_BIN_EXE_giroident-broker"));
    command.args(["sim", "--listen", "127.0.0.1:0"]);
    if let Some(bound) = max_entries {
        command.args(["--max-entries", bound]);
    }
    let mut child = command
        .env_clear()
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("the binary runs");
    let mut lines = BufReader::new(child.stderr.take().expect("stderr")).lines();
    for line in lines.by_ref().map_while(Result::ok) {
        if let Ok(log) = serde_json::from_str::<serde_json::Value>(&line)
            && log["message"] == "finAPI simulator listening"
        {
            let addr = log["addr"].as_str().expect("addr").to_owned();
            std::thread::spawn(move || lines.for_each(drop));
            return (child, addr);
        }
    }
    panic!("the simulator exited without listening: {:?}", child.wait());
}
