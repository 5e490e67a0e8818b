//! `SIGHUP` on the broker binary: the secrets and callers are read again and swapped in while
//! the same process keeps serving; a reload with problems changes nothing and names them all.

mod common;

use std::path::PathBuf;
use std::process::{Child, Command};
use std::time::Duration;

use common::{client_with_key, expect_created, expect_problem, spawn_broker_binary};
use giroident_broker::identities::IdentityStore;
use giroident_broker::identities::keys::PasswordKey;
use giroident_broker::sim::{
    self, DEMO_CLIENT_ID, DEMO_CLIENT_SECRET, SimClient, SimConfig, SimHandle,
};
use secrecy::SecretString;
use serde_json::{Value, json};
use tokio::sync::mpsc::UnboundedReceiver;

const KEY_A: &str = "reload-test-password-key-A-0123456789abcdef";
const KEY_B: &str = "reload-test-password-key-B-0123456789abcdef";
const FIRST_KEY: &str = "first-caller-api-key-0123";
const SECOND_KEY: &str = "second-caller-api-key-4567";

/// A directory of its own for one test's files.
struct Dir(PathBuf);

impl Dir {
    fn new() -> Self {
        let path = std::env::temp_dir().join(format!(
            "giroident-broker-reload-{}",
            uuid::Uuid::new_v4().simple()
        ));
        std::fs::create_dir_all(&path).unwrap();
        Self(path)
    }

    /// Writes `name` in one step (a rename), as Kubernetes swaps a mounted Secret.
    fn write(&self, name: &str, text: &str) -> PathBuf {
        let path = self.0.join(name);
        let next = self.0.join(format!(".{name}.next"));
        std::fs::write(&next, text).unwrap();
        std::fs::rename(&next, &path).unwrap();
        path
    }

    fn path(&self, name: &str) -> String {
        self.0.join(name).display().to_string()
    }

    fn database_url(&self) -> String {
        format!("sqlite://{}", self.path("ledger.db"))
    }
}

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A config file with `callers` (name, key file) and the given extra TOML.
fn config(dir: &Dir, callers: &[(&str, &str)], extra: &str) -> PathBuf {
    let mut text = format!(
        "[finapi]\nclient_secret_file = {:?}\n{extra}\n",
        dir.path("client-secret")
    );
    for (name, key_file) in callers {
        text.push_str(&format!(
            "[[auth.callers]]\nname = {name:?}\nkey_file = {:?}\nflows = [\"access\", \"standalone\"]\n",
            dir.path(key_file)
        ));
    }
    dir.write("broker.toml", &text)
}

/// Identity keys from files, the newest first.
fn identity_keys(dir: &Dir, newest: &str, previous: &[&str]) -> String {
    let previous: Vec<String> = previous.iter().map(|f| dir.path(f)).collect();
    format!(
        "[identities]\npassword_key_file = {:?}\nprevious_password_key_files = {previous:?}\n",
        dir.path(newest)
    )
}

/// The broker binary with `--config` and the simulator's addresses in the environment.
struct Broker {
    child: Child,
    url: String,
    admin_url: String,
    logs: UnboundedReceiver<Value>,
    seen: Vec<Value>,
}

impl Broker {
    fn start(dir: &Dir, sim: &SimHandle) -> Self {
        Self::start_with(dir, sim, true)
    }

    /// Like [`Broker::start`]; without `single_client_env` the simulator's client comes from
    /// the config file alone (e.g. a `[finapi.clients.default]` table).
    fn start_with(dir: &Dir, sim: &SimHandle, single_client_env: bool) -> Self {
        let mut command = Command::new(env!("CARGO_BIN_EXE_giroident-broker"));
        command
            .args(["serve", "--config"])
            .arg(dir.0.join("broker.toml"))
            .env_clear()
            .envs([
                ("GIROIDENT_BROKER_SERVER__LISTEN", "127.0.0.1:0"),
                ("GIROIDENT_BROKER_ADMIN__LISTEN", "127.0.0.1:0"),
                ("GIROIDENT_BROKER_FINAPI__ALLOW_INSECURE_HTTP", "true"),
                (
                    "GIROIDENT_BROKER_IDENTITIES__DATABASE_URL",
                    &dir.database_url(),
                ),
                ("GIROIDENT_BROKER_LOG__FORMAT", "json"),
                ("GIROIDENT_BROKER_LOG__FILTER", "info"),
            ]);
        if single_client_env {
            command.envs([
                ("GIROIDENT_BROKER_FINAPI__ACCESS_URL", &sim.base_url()),
                (
                    "GIROIDENT_BROKER_FINAPI__PROCESS_CONTROLLER_URL",
                    &sim.base_url(),
                ),
                (
                    "GIROIDENT_BROKER_FINAPI__CLIENT_ID",
                    &DEMO_CLIENT_ID.to_owned(),
                ),
            ]);
        }
        let (lines_tx, lines_rx) = std::sync::mpsc::channel::<String>();
        let (child, url) = spawn_broker_binary(command, Some(lines_tx));
        // The listening line, already read for the URL, names the admin address too.
        let mut seen = Vec::new();
        let admin_addr = loop {
            let line = lines_rx
                .recv_timeout(Duration::from_secs(20))
                .expect("the broker logs");
            let Ok(log) = serde_json::from_str::<Value>(&line) else {
                continue;
            };
            seen.push(log.clone());
            if log["message"] == "broker listening" {
                break log["admin_addr"].as_str().unwrap_or("").to_owned();
            }
        };
        let (logs_tx, logs) = tokio::sync::mpsc::unbounded_channel();
        std::thread::spawn(move || {
            for line in lines_rx {
                if let Ok(log) = serde_json::from_str::<Value>(&line)
                    && logs_tx.send(log).is_err()
                {
                    return;
                }
            }
        });
        Self {
            child,
            url,
            admin_url: format!("http://{admin_addr}"),
            logs,
            seen,
        }
    }

    /// Sends `SIGHUP` and returns the reload's outcome line.
    async fn hang_up(&mut self) -> Value {
        let status = Command::new("kill")
            .args(["-HUP", &self.child.id().to_string()])
            .status()
            .expect("kill runs");
        assert!(status.success());
        self.log_line(|log| {
            log["message"] == "configuration reloaded"
                || log["message"]
                    == "configuration reload rejected: the running configuration stays"
        })
        .await
    }

    /// The first log line from now on that `matches`.
    async fn log_line(&mut self, matches: impl Fn(&Value) -> bool) -> Value {
        let wait = async {
            loop {
                let log = self.logs.recv().await.expect("the broker still logs");
                self.seen.push(log.clone());
                if matches(&log) {
                    return log;
                }
            }
        };
        tokio::time::timeout(Duration::from_secs(20), wait)
            .await
            .expect("the log line arrives")
    }

    /// Whether the same process is still running.
    fn still_running(&mut self) -> bool {
        self.child.try_wait().expect("try_wait").is_none()
    }

    async fn session(&self, key: &str, body: Value) -> reqwest::Response {
        client_with_key(key)
            .post(format!("{}/kyc-sessions", self.url))
            .json(&body)
            .send()
            .await
            .expect("the broker answers")
    }

    async fn metrics(&self) -> String {
        reqwest::get(format!("{}/metrics", self.admin_url))
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn access() -> Value {
    json!({"flow": "access"})
}

async fn simulator() -> SimHandle {
    sim::start(SimConfig::default()).await.expect("simulator")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_adds_and_removes_callers_and_names_what_needs_a_restart() {
    let sim = simulator().await;
    let dir = Dir::new();
    dir.write("client-secret", &format!("{DEMO_CLIENT_SECRET}\n"));
    dir.write("first.key", FIRST_KEY);
    dir.write("second.key", SECOND_KEY);
    dir.write("key-a", KEY_A);
    let keys = identity_keys(&dir, "key-a", &[]);
    config(&dir, &[("first", "first.key")], &keys);
    let mut broker = tokio::task::block_in_place(|| Broker::start(&dir, &sim));
    let pid = broker.child.id();
    expect_created(broker.session(FIRST_KEY, access()).await).await;
    expect_problem(
        broker.session(SECOND_KEY, access()).await,
        401,
        "INVALID_API_KEY",
    )
    .await;

    config(
        &dir,
        &[("second", "second.key")],
        &format!("{keys}\n[server]\ndrain_secs = 7\n"),
    );
    let reloaded = broker.hang_up().await;
    assert_eq!(reloaded["callers_added"], "second", "{reloaded}");
    assert_eq!(reloaded["callers_removed"], "first", "{reloaded}");
    let warning = broker
        .log_line(|log| log["message"] == "changed settings take effect only after a restart")
        .await;
    assert_eq!(warning["keys"], "server.drain_secs", "{warning}");

    expect_created(broker.session(SECOND_KEY, access()).await).await;
    expect_problem(
        broker.session(FIRST_KEY, access()).await,
        401,
        "INVALID_API_KEY",
    )
    .await;
    // A caller's key file rewritten: the new key works, the old one no longer does.
    dir.write("second.key", "second-caller-rotated-key-89");
    let reloaded = broker.hang_up().await;
    assert_eq!(
        reloaded["secrets_changed"], "auth.callers.second.key",
        "{reloaded}"
    );
    expect_created(
        broker
            .session("second-caller-rotated-key-89", access())
            .await,
    )
    .await;
    expect_problem(
        broker.session(SECOND_KEY, access()).await,
        401,
        "INVALID_API_KEY",
    )
    .await;
    // finAPI's secret rotated by the operator, the file rewritten, then the signal.
    assert!(sim.change_client_secret(DEMO_CLIENT_ID, "rotated-by-the-operator"));
    dir.write("client-secret", "rotated-by-the-operator\n");
    let reloaded = broker.hang_up().await;
    assert_eq!(
        reloaded["secrets_changed"], "finapi.client_secret",
        "{reloaded}"
    );
    let rotated = "second-caller-rotated-key-89";
    expect_created(broker.session(rotated, access()).await).await;
    let standalone = json!({"flow": "standalone", "clientReference": "after-sighup"});
    expect_created(broker.session(rotated, standalone).await).await;

    assert!(broker.still_running());
    assert_eq!(broker.child.id(), pid);
    let metrics = broker.metrics().await;
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("broker_config_reloads_total{outcome=\"ok\"} 3")),
        "{metrics}"
    );
    let logs = serde_json::to_string(&broker.seen).unwrap();
    for secret in [
        FIRST_KEY,
        SECOND_KEY,
        "second-caller-rotated-key-89",
        KEY_A,
        DEMO_CLIENT_SECRET,
        "rotated-by-the-operator",
    ] {
        assert!(!logs.contains(secret), "a secret was logged");
    }
}

/// A named client (`[finapi.clients.live]`): `live`'s client table in the config file.
fn live_client(dir: &Dir, sim: &SimHandle) -> String {
    format!(
        "[finapi.clients.live]\nclient_id = \"live-client\"\nclient_secret_file = {:?}\n\
         access_url = {:?}\nprocess_controller_url = {:?}\n",
        dir.path("live-secret"),
        sim.base_url(),
        sim.base_url(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_takes_a_named_clients_rotated_secret_and_refuses_a_client_added_since_start() {
    let mut config_sim = SimConfig::default();
    config_sim
        .clients
        .push(SimClient::new("live-client", "live-secret-before"));
    let sim = sim::start(config_sim).await.expect("simulator");
    let dir = Dir::new();
    dir.write("client-secret", &format!("{DEMO_CLIENT_SECRET}\n"));
    dir.write("live-secret", "live-secret-before\n");
    dir.write("first.key", FIRST_KEY);
    dir.write("key-a", KEY_A);
    let keys = identity_keys(&dir, "key-a", &[]);
    let both = "finapi_clients = [\"default\", \"live\"]\n";
    let with_clients = |extra: &str| {
        format!(
            "[finapi]\nclient_secret_file = {:?}\n{keys}\n{}{extra}\
             [[auth.callers]]\nname = \"first\"\nkey_file = {:?}\n\
             flows = [\"access\", \"standalone\"]\n{both}",
            dir.path("client-secret"),
            live_client(&dir, &sim),
            dir.path("first.key"),
        )
    };
    dir.write("broker.toml", &with_clients(""));
    let mut broker = tokio::task::block_in_place(|| Broker::start(&dir, &sim));
    let live = json!({"flow": "access", "finapiClient": "live"});
    let created = expect_created(broker.session(FIRST_KEY, live.clone()).await).await;
    assert_eq!(created["finapiClient"], "live", "{created}");

    // `live`'s secret rotated at finAPI and in its file, then the signal: only `live` changed.
    assert!(sim.change_client_secret("live-client", "live-secret-after"));
    dir.write("live-secret", "live-secret-after\n");
    let reloaded = broker.hang_up().await;
    assert_eq!(
        reloaded["secrets_changed"], "finapi.clients.live.client_secret",
        "{reloaded}"
    );
    expect_created(broker.session(FIRST_KEY, live.clone()).await).await;
    expect_created(broker.session(FIRST_KEY, access()).await).await;

    // A client added to the file since the start cannot be given to a caller by a reload.
    let added = format!(
        "[finapi.clients.extra]\nclient_id = \"extra-client\"\nclient_secret_file = {:?}\n\
         access_url = {:?}\nprocess_controller_url = {:?}\n",
        dir.path("live-secret"),
        sim.base_url(),
        sim.base_url(),
    );
    let text = with_clients(&added).replace(both, "finapi_clients = [\"default\", \"extra\"]\n");
    dir.write("broker.toml", &text);
    let rejected = broker.hang_up().await;
    assert_eq!(rejected["level"], "ERROR", "{rejected}");
    let problems = rejected["problems"].as_str().unwrap();
    assert!(
        problems.contains("auth.callers[0].finapi_clients") && problems.contains("extra"),
        "{problems}"
    );
    expect_created(broker.session(FIRST_KEY, live).await).await;
    assert!(broker.still_running());
    let logs = serde_json::to_string(&broker.seen).unwrap();
    for secret in [
        "live-secret-before",
        "live-secret-after",
        DEMO_CLIENT_SECRET,
    ] {
        assert!(!logs.contains(secret), "a secret was logged");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_finapi_clients_default_table_is_named_by_its_table_in_reload_lines() {
    let sim = simulator().await;
    let dir = Dir::new();
    dir.write("default-secret", &format!("{DEMO_CLIENT_SECRET}\n"));
    dir.write("first.key", FIRST_KEY);
    dir.write("key-a", KEY_A);
    let keys = identity_keys(&dir, "key-a", &[]);
    let with_access_url = |access_url: &str| {
        format!(
            "[finapi.clients.default]\nclient_id = {DEMO_CLIENT_ID:?}\nclient_secret_file = {:?}\n\
             access_url = {access_url:?}\nprocess_controller_url = {:?}\n{keys}\n\
             [[auth.callers]]\nname = \"first\"\nkey_file = {:?}\nflows = [\"standalone\"]\n",
            dir.path("default-secret"),
            sim.base_url(),
            dir.path("first.key"),
        )
    };
    dir.write("broker.toml", &with_access_url(&sim.base_url()));
    let mut broker = tokio::task::block_in_place(|| Broker::start_with(&dir, &sim, false));
    let standalone = json!({"flow": "standalone", "clientReference": "default-table"});
    expect_created(broker.session(FIRST_KEY, standalone.clone()).await).await;

    // The table's secret rotated and its host changed: the secret is taken, the host needs a
    // restart, and both are named by the table's keys.
    assert!(sim.change_client_secret(DEMO_CLIENT_ID, "default-table-rotated"));
    dir.write("default-secret", "default-table-rotated\n");
    dir.write("broker.toml", &with_access_url("http://elsewhere.example"));
    let reloaded = broker.hang_up().await;
    assert_eq!(
        reloaded["secrets_changed"], "finapi.clients.default.client_secret",
        "{reloaded}"
    );
    let warning = broker
        .log_line(|log| log["message"] == "changed settings take effect only after a restart")
        .await;
    assert_eq!(warning["keys"], "finapi.clients.default", "{warning}");
    expect_created(broker.session(FIRST_KEY, standalone).await).await;
    assert!(broker.still_running());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ca_file_rewritten_in_place_is_named_as_needing_a_restart() {
    let mut config_sim = SimConfig::default();
    config_sim
        .clients
        .push(SimClient::new("live-client", "live-secret"));
    let sim = sim::start(config_sim).await.expect("simulator");
    let dir = Dir::new();
    dir.write("client-secret", &format!("{DEMO_CLIENT_SECRET}\n"));
    dir.write("live-secret", "live-secret\n");
    dir.write("first.key", FIRST_KEY);
    dir.write("key-a", KEY_A);
    let first_ca = sim::SimCa::generate().expect("an authority");
    dir.write("live-ca.pem", first_ca.cert_pem());
    let text = format!(
        "[finapi]\nclient_secret_file = {:?}\n{}{}ca_file = {:?}\n\
         [[auth.callers]]\nname = \"first\"\nkey_file = {:?}\nflows = [\"standalone\"]\n\
         finapi_clients = [\"default\", \"live\"]\n",
        dir.path("client-secret"),
        identity_keys(&dir, "key-a", &[]),
        live_client(&dir, &sim),
        dir.path("live-ca.pem"),
        dir.path("first.key"),
    );
    dir.write("broker.toml", &text);
    let mut broker = tokio::task::block_in_place(|| Broker::start(&dir, &sim));

    // Nothing changed: no warning.
    let reloaded = broker.hang_up().await;
    assert_eq!(reloaded["message"], "configuration reloaded", "{reloaded}");
    // The authority's file rewritten under the same name (a ConfigMap updated): the running
    // client keeps the bundle it was built with, and the reload says so.
    let next_ca = sim::SimCa::generate().expect("an authority");
    dir.write("live-ca.pem", next_ca.cert_pem());
    let reloaded = broker.hang_up().await;
    assert_eq!(reloaded["message"], "configuration reloaded", "{reloaded}");
    let warning = broker
        .log_line(|log| log["message"] == "changed settings take effect only after a restart")
        .await;
    assert_eq!(warning["keys"], "finapi.clients.live.ca_file", "{warning}");
    let warnings = broker
        .seen
        .iter()
        .filter(|log| log["message"] == "changed settings take effect only after a restart")
        .count();
    assert_eq!(warnings, 1, "the unchanged reload warned");
    assert!(broker.still_running());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_with_problems_keeps_the_running_configuration_and_names_them_all() {
    let sim = simulator().await;
    let dir = Dir::new();
    dir.write("client-secret", &format!("{DEMO_CLIENT_SECRET}\n"));
    dir.write("first.key", FIRST_KEY);
    dir.write("key-a", KEY_A);
    let keys = identity_keys(&dir, "key-a", &[]);
    config(&dir, &[("first", "first.key")], &keys);
    let mut broker = tokio::task::block_in_place(|| Broker::start(&dir, &sim));

    // Three mistakes at once: a missing key file, an unknown flow, a key too short.
    dir.write("short-key", "too-short");
    let text = format!(
        "[finapi]\nclient_secret_file = {:?}\n{}\n\
         [[auth.callers]]\nname = \"first\"\nkey_file = {:?}\nflows = [\"access\"]\n\
         [[auth.callers]]\nname = \"second\"\nkey_file = {:?}\nflows = [\"video\"]\n",
        dir.path("client-secret"),
        identity_keys(&dir, "short-key", &[]),
        dir.path("first.key"),
        dir.path("missing.key"),
    );
    dir.write("broker.toml", &text);
    let rejected = broker.hang_up().await;
    assert_eq!(rejected["level"], "ERROR", "{rejected}");
    let problems = rejected["problems"].as_str().unwrap();
    for key in [
        "auth.callers[1].key_file",
        "auth.callers[1].flows",
        "identities.password_key_file",
    ] {
        assert!(problems.contains(key), "{key} missing from {problems}");
    }
    assert!(!problems.contains("too-short"), "{problems}");
    // The running configuration serves on.
    expect_created(broker.session(FIRST_KEY, access()).await).await;
    assert!(broker.still_running());
    let metrics = broker.metrics().await;
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("broker_config_reloads_total{outcome=\"rejected\"} 1")),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_password_key_becomes_the_newest_and_one_still_in_use_cannot_be_dropped() {
    let sim = simulator().await;
    let dir = Dir::new();
    dir.write("client-secret", &format!("{DEMO_CLIENT_SECRET}\n"));
    dir.write("first.key", FIRST_KEY);
    dir.write("key-a", KEY_A);
    dir.write("key-b", KEY_B);
    let callers = [("first", "first.key")];
    config(&dir, &callers, &identity_keys(&dir, "key-a", &[]));
    let mut broker = tokio::task::block_in_place(|| Broker::start(&dir, &sim));
    let customer = |reference: &str| json!({"flow": "access", "clientReference": reference});
    let old = expect_created(broker.session(FIRST_KEY, customer("customer-1")).await).await;

    // Dropping key A while customer-1's identity needs it is refused.
    config(&dir, &callers, &identity_keys(&dir, "key-b", &[]));
    let rejected = broker.hang_up().await;
    let problems = rejected["problems"].as_str().unwrap_or_default();
    assert!(
        problems.contains("identities.previous_password_key_files"),
        "{rejected}"
    );

    config(&dir, &callers, &identity_keys(&dir, "key-b", &["key-a"]));
    let reloaded = broker.hang_up().await;
    assert_eq!(
        reloaded["secrets_changed"], "identities.password_key,identities.previous_password_keys",
        "{reloaded}"
    );
    // customer-1 keeps its identity (found and logged in under key A); a new customer's
    // identity is made with key B.
    let again = expect_created(broker.session(FIRST_KEY, customer("customer-1")).await).await;
    assert_eq!(again["identity"], "reused", "{again}");
    assert_eq!(again["userId"], old["userId"]);
    expect_created(broker.session(FIRST_KEY, customer("customer-2")).await).await;
    let store = IdentityStore::connect(&SecretString::from(dir.database_url()), 1)
        .await
        .unwrap();
    let key_b = PasswordKey::new(SecretString::from(KEY_B)).unwrap();
    let record = store
        .find_latest(
            "first",
            "default",
            &key_b.reference_digest("first", "customer-2"),
        )
        .await
        .unwrap()
        .expect("customer-2's identity is recorded under key B");
    assert_eq!(record.key_id, key_b.id());
    assert!(broker.still_running());
}
