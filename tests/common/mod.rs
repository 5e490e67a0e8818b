//! Shared setup of the integration tests: the real simulator and the real broker, both on
//! 127.0.0.1 port 0, talking over real sockets.
#![allow(dead_code)] // each test binary uses a different part of this module

pub mod pg;

use std::time::Duration;

use giroident_broker::config::{FinapiClientSettings, Settings};
use giroident_broker::demo::{Ledger, settings_for_simulator};
use giroident_broker::flows::{Flows, ResilienceSnapshot};
use giroident_broker::sim::{self, SimConfig, SimHandle};
use giroident_broker::startup::Application;
use secrecy::SecretString;
use serde_json::{Value, json};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// A running simulator and a broker pointed at it.
pub struct TestEnv {
    pub sim: SimHandle,
    pub broker_url: String,
    pub admin_url: String,
    pub http: reqwest::Client,
    pub flows: std::sync::Arc<Flows>,
    stop: Option<oneshot::Sender<()>>,
    server: Option<JoinHandle<()>>,
}

/// The API key of the test caller `demo` (both flows).
pub const TEST_API_KEY: &str = "test-api-key-0123456789";

/// The identity password key of test brokers (at least 32 bytes).
pub const TEST_PASSWORD_KEY: &str = "test-password-key-0123456789-abcdefghijklmnop";

/// A ledger in a fresh SQLite file, with the test password key. The file goes to Cargo's
/// directory for integration-test files (`target/tmp`, removed by `cargo clean`), not to the
/// system's temporary directory, which a test run would otherwise fill with hundreds of them.
pub fn sqlite_ledger() -> Ledger {
    let path = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!(
        "giroident-broker-test-{}.db",
        uuid::Uuid::new_v4().simple()
    ));
    ledger_at(&format!("sqlite://{}", path.display()))
}

/// A ledger at `database_url`, with the test password key.
pub fn ledger_at(database_url: &str) -> Ledger {
    Ledger {
        database_url: SecretString::from(database_url.to_owned()),
        password_key: SecretString::from(TEST_PASSWORD_KEY),
    }
}

/// Settings for a broker in front of `sim`, with the demo client, the test caller and a fresh
/// SQLite ledger.
pub fn settings_for(sim: &SimHandle) -> Settings {
    settings_with_ledger(sim, &sqlite_ledger())
}

/// Settings for a broker in front of `sim`, with the demo client, the test caller and `ledger`.
pub fn settings_with_ledger(sim: &SimHandle, ledger: &Ledger) -> Settings {
    let key = SecretString::from(TEST_API_KEY);
    let any_port = "127.0.0.1:0".parse().unwrap();
    let mut settings =
        settings_for_simulator(any_port, any_port, &sim.base_url(), None, &key, ledger).unwrap();
    // Tests fire bursts of hundreds of requests; rate limits are tested on their own.
    settings.limits.caller_rate_per_sec = 1_000_000;
    settings.limits.caller_burst = 1_000_000;
    settings.limits.max_in_flight = 10_000;
    settings
}

/// Adds the finAPI client `name` (client id `client_id`, secret `secret`) at `sim` to
/// validated settings, as a `[finapi.clients.NAME]` table would.
pub fn add_finapi_client(
    settings: &mut Settings,
    name: &str,
    sim: &SimHandle,
    client_id: &str,
    secret: &str,
) {
    settings.finapi.clients.insert(
        name.to_owned(),
        FinapiClientSettings {
            client_id: client_id.to_owned(),
            client_secret: Some(SecretString::from(secret.to_owned())),
            client_secret_file: None,
            access_url: sim.base_url(),
            process_controller_url: sim.base_url(),
            process_id: None,
            ca_file: None,
        },
    );
}

/// A fresh certificate authority for a test, its certificate in a temporary PEM file (the
/// broker's `finapi.ca_file`), removed when dropped.
pub struct TestCa {
    pub ca: sim::SimCa,
    pub file: std::path::PathBuf,
}

impl TestCa {
    pub fn new() -> Self {
        let ca = sim::SimCa::generate().expect("an authority");
        let file = std::env::temp_dir().join(format!(
            "giroident-broker-test-ca-{}.pem",
            uuid::Uuid::new_v4().simple()
        ));
        std::fs::write(&file, ca.cert_pem()).expect("the CA file is written");
        Self { ca, file }
    }

    /// A server certificate for 127.0.0.1 and localhost, valid now.
    pub fn local_tls(&self) -> sim::SimTls {
        self.ca.issue(&sim::LOCAL_NAMES).expect("a certificate")
    }
}

impl Drop for TestCa {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.file);
    }
}

/// Settings for a broker in front of an HTTPS `sim`, trusting `ca_file` (`finapi.ca_file`),
/// with the demo client, the test caller and a fresh SQLite ledger.
pub fn settings_for_tls(sim: &SimHandle, ca_file: &std::path::Path) -> Settings {
    let key = SecretString::from(TEST_API_KEY);
    let any_port = "127.0.0.1:0".parse().unwrap();
    let mut settings = settings_for_simulator(
        any_port,
        any_port,
        &sim.base_url(),
        Some(ca_file),
        &key,
        &sqlite_ledger(),
    )
    .unwrap();
    settings.limits.caller_rate_per_sec = 1_000_000;
    settings.limits.caller_burst = 1_000_000;
    settings.limits.max_in_flight = 10_000;
    settings
}

impl TestEnv {
    /// A simulator serving HTTPS with `tls` (`sim_config.tls` is replaced), and a broker that
    /// trusts `ca`'s certificate through `finapi.ca_file`, its settings changed by `tweak`.
    /// The test's own client trusts `ca` too, for calls to the simulator.
    pub async fn with_tls(
        mut sim_config: SimConfig,
        tls: sim::SimTls,
        ca: &TestCa,
        tweak: impl FnOnce(&mut Settings),
    ) -> Self {
        sim_config.tls = Some(tls);
        let sim = sim::start(sim_config).await.expect("simulator starts");
        let mut settings = settings_for_tls(&sim, &ca.file);
        tweak(&mut settings);
        let mut env = Self::with_settings(sim, &settings).await;
        env.http = client_trusting(TEST_API_KEY, ca.ca.cert_pem());
        env
    }

    /// Default simulator, default broker settings.
    pub async fn start() -> Self {
        Self::with(SimConfig::default(), |_| {}).await
    }

    /// A simulator with `sim_config`, and a broker whose settings `tweak` may change.
    pub async fn with(sim_config: SimConfig, tweak: impl FnOnce(&mut Settings)) -> Self {
        let sim = sim::start(sim_config).await.expect("simulator starts");
        let mut settings = settings_for(&sim);
        tweak(&mut settings);
        Self::with_settings(sim, &settings).await
    }

    /// A broker built from `settings`, in front of `sim`.
    pub async fn with_settings(sim: SimHandle, settings: &Settings) -> Self {
        let app = Application::build(settings).await.expect("broker starts");
        let broker_url = format!("http://{}", app.local_addr());
        let admin_url = format!("http://{}", app.admin_addr());
        let flows = app.flows();
        let (stop, stopped) = oneshot::channel::<()>();
        let server = tokio::spawn(app.run_until_stopped(async {
            let _ = stopped.await;
        }));
        Self {
            sim,
            broker_url,
            admin_url,
            http: client_with_key(TEST_API_KEY),
            flows,
            stop: Some(stop),
            server: Some(server),
        }
    }

    /// `POST /kyc-sessions` with a JSON body.
    pub async fn start_session(&self, body: Value) -> reqwest::Response {
        self.http
            .post(format!("{}/kyc-sessions", self.broker_url))
            .json(&body)
            .send()
            .await
            .expect("broker answers")
    }

    /// A standalone session that must succeed; returns its JSON body.
    pub async fn standalone_session(&self, reference: &str) -> Value {
        let response = self
            .start_session(json!({"flow": "standalone", "clientReference": reference}))
            .await;
        expect_created(response).await
    }

    /// An access session that must succeed; returns its JSON body.
    pub async fn access_session(&self) -> Value {
        expect_created(self.start_session(json!({"flow": "access"})).await).await
    }

    /// `DELETE /kyc-sessions/current` with a bearer token.
    pub async fn delete_current(&self, token: &str) -> reqwest::Response {
        self.http
            .delete(format!("{}/kyc-sessions/current", self.broker_url))
            .bearer_auth(token)
            .send()
            .await
            .expect("broker answers")
    }

    /// `GET /api/v2/users` on the simulator: proves whether a user token works.
    pub async fn sim_user(&self, token: &str) -> reqwest::Response {
        self.http
            .get(format!("{}/api/v2/users", self.sim.base_url()))
            .bearer_auth(token)
            .send()
            .await
            .expect("simulator answers")
    }

    /// A client token straight from the simulator, for tests that need a non-user token.
    pub async fn sim_client_token(&self) -> String {
        let body: Value = self
            .http
            .post(format!("{}/api/v2/oauth/token", self.sim.base_url()))
            .form(&[
                ("grant_type", "client_credentials"),
                ("client_id", sim::DEMO_CLIENT_ID),
                ("client_secret", sim::DEMO_CLIENT_SECRET),
            ])
            .send()
            .await
            .expect("simulator answers")
            .json()
            .await
            .expect("token JSON");
        body["access_token"].as_str().expect("token").to_owned()
    }

    /// How many calls of `endpoint` (a stats key) the simulator answered with `status`.
    pub fn calls(&self, endpoint: &str, status: &str) -> u64 {
        self.sim
            .stats()
            .get(endpoint)
            .and_then(|by_status| by_status.get(status))
            .copied()
            .unwrap_or(0)
    }

    /// How many calls of `endpoint` the simulator saw, whatever their outcome.
    pub fn all_calls(&self, endpoint: &str) -> u64 {
        self.sim
            .stats()
            .get(endpoint)
            .map(|by_status| by_status.values().sum())
            .unwrap_or(0)
    }

    /// The broker's resilience counters.
    pub fn resilience(&self) -> ResilienceSnapshot {
        self.flows.stats()
    }

    /// The Prometheus text of the broker's admin listener.
    pub async fn metrics_text(&self) -> String {
        self.http
            .get(format!("{}/metrics", self.admin_url))
            .send()
            .await
            .expect("admin listener answers")
            .text()
            .await
            .expect("metrics text")
    }

    /// Stops the broker (after its drain period) and the simulator.
    /// Stops the broker and hands back its simulator, for a restarted broker.
    pub async fn stop_broker_keep_sim(mut self) -> SimHandle {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(server) = self.server.take() {
            server.await.expect("broker task");
        }
        self.sim
    }

    pub async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(server) = self.server.take() {
            server.await.expect("broker task");
        }
    }
}

pub const CLIENT_TOKEN: &str = "POST /api/v2/oauth/token client_credentials";
pub const PASSWORD_TOKEN: &str = "POST /api/v2/oauth/token password";
pub const CREATE_USER: &str = "POST /api/v2/users";
pub const CREATE_PROCESS: &str = "POST /api/v1/processes";
pub const EXCHANGE: &str = "GET /api/v1/processes/{processToken}";

/// An HTTP client that sends `X-Api-Key: key` with every request.
pub fn client_with_key(key: &str) -> reqwest::Client {
    // reqwest is built without a default TLS provider; a test may build a client first.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let mut headers = reqwest::header::HeaderMap::new();
    headers.insert("x-api-key", key.parse().expect("header value"));
    reqwest::Client::builder()
        .default_headers(headers)
        .build()
        .expect("client")
}

/// Like [`client_with_key`], and trusting the authority of `ca_pem` besides the system roots.
pub fn client_trusting(key: &str, ca_pem: &str) -> reqwest::Client {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let mut headers = reqwest::header::HeaderMap::new();
    headers.insert("x-api-key", key.parse().expect("header value"));
    reqwest::Client::builder()
        .default_headers(headers)
        .tls_certs_merge(reqwest::Certificate::from_pem_bundle(ca_pem.as_bytes()).expect("PEM"))
        .build()
        .expect("client")
}

/// Asserts a `201` with the token headers and returns the body.
pub async fn expect_created(response: reqwest::Response) -> Value {
    let status = response.status();
    let cache_control = response
        .headers()
        .get("cache-control")
        .map(|v| v.to_str().unwrap().to_owned());
    let body: Value = response.json().await.expect("JSON body");
    assert_eq!(status, 201, "unexpected answer: {body}");
    assert_eq!(cache_control.as_deref(), Some("no-store"));
    body
}

/// Asserts a problem answer with `status` and `code`, and returns its body.
pub async fn expect_problem(response: reqwest::Response, status: u16, code: &str) -> Value {
    let got = response.status().as_u16();
    let content_type = response
        .headers()
        .get("content-type")
        .map(|v| v.to_str().unwrap().to_owned());
    let echoed_id = response
        .headers()
        .get("x-request-id")
        .map(|v| v.to_str().unwrap().to_owned());
    let text = response.text().await.expect("body");
    assert_eq!(got, status, "unexpected answer: {text}");
    assert_eq!(
        content_type.as_deref(),
        Some("application/problem+json"),
        "{text}"
    );
    let body: Value = serde_json::from_str(&text).expect("problem JSON");
    assert_eq!(body["code"], code, "{body}");
    assert_eq!(body["status"], status, "{body}");
    assert!(body["title"].is_string(), "{body}");
    assert!(body["type"].is_string(), "{body}");
    assert_eq!(body["requestId"].as_str(), echoed_id.as_deref(), "{body}");
    body
}

/// Polls `condition` until it holds or `within` passes.
pub async fn eventually(within: Duration, mut condition: impl FnMut() -> bool) -> bool {
    let deadline = tokio::time::Instant::now() + within;
    while tokio::time::Instant::now() < deadline {
        if condition() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    condition()
}

/// `[tracing]` settings exporting to the collector at `endpoint` (`traces_endpoint` derived,
/// service `broker-under-test`, no propagation to finAPI).
pub fn tracing_settings(
    endpoint: &str,
    sampler: &str,
    headers: &str,
    timeout_ms: u64,
    max_queue_size: u64,
) -> giroident_broker::config::TracingSettings {
    toml::from_str(&format!(
        r#"
        endpoint = "{endpoint}"
        traces_endpoint = ""
        service_name = "broker-under-test"
        sampler = "{sampler}"
        sampler_arg = 1.0
        headers = "{headers}"
        timeout_ms = {timeout_ms}
        max_queue_size = {max_queue_size}
        propagate_to_finapi = false
        "#
    ))
    .expect("tracing settings")
}

/// Log output captured in memory: a `MakeWriter` for `telemetry::init_with_writer`.
#[derive(Clone, Default)]
pub struct CapturedLogs(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

impl CapturedLogs {
    /// Installs the global subscriber writing `format` lines at `filter` into this buffer.
    pub fn install(format: giroident_broker::config::LogFormat, filter: &str) -> Self {
        let logs = Self::default();
        let writer = logs.clone();
        assert!(
            giroident_broker::telemetry::init_with_writer(format, filter, move || writer.clone()),
            "a subscriber was installed already"
        );
        logs
    }

    /// Installs the global subscriber writing JSON lines at `filter` into this buffer and
    /// exporting spans over OTLP/HTTP as `tracing` says; returns the export's guard (dropping
    /// it flushes and stops the export).
    pub fn install_exporting(
        filter: &str,
        tracing: &giroident_broker::config::TracingSettings,
    ) -> (Self, giroident_broker::telemetry::otel::OtelGuard) {
        let logs = Self::default();
        let writer = logs.clone();
        let (installed, guard) = giroident_broker::telemetry::install(
            giroident_broker::config::LogFormat::Json,
            filter,
            move || writer.clone(),
            Some(tracing),
        )
        .expect("exporter starts");
        assert!(installed, "a subscriber was installed already");
        (logs, guard.expect("an endpoint was configured"))
    }

    /// Everything written so far.
    pub fn text(&self) -> String {
        String::from_utf8(self.0.lock().unwrap().clone()).expect("UTF-8 logs")
    }
}

impl std::io::Write for CapturedLogs {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Bounds for the ledger's tests: a 2 s request timeout and session budget, 1 s finAPI calls,
/// a reaper every second, and intents left to the reaper once older than `orphan_min_age_secs`.
pub fn quick_ledger(s: &mut Settings, orphan_min_age_secs: u64) {
    s.server.request_timeout_secs = 2;
    s.finapi.request_timeout_ms = 1_000;
    s.resilience.session_budget_ms = 2_000;
    s.identities.reaper_interval_secs = 1;
    s.identities.orphan_min_age_secs = orphan_min_age_secs;
}

/// The ledger of `ledger`, opened beside the broker (two connections), for tests that read
/// or change its records.
pub async fn ledger_store(ledger: &Ledger) -> giroident_broker::identities::IdentityStore {
    giroident_broker::identities::IdentityStore::connect(&ledger.database_url, 2)
        .await
        .expect("the ledger opens")
}

/// The database file of the SQLite ledger `ledger` (a `sqlite://` URL).
pub fn sqlite_path(ledger: &Ledger) -> String {
    use secrecy::ExposeSecret;
    ledger
        .database_url
        .expose_secret()
        .strip_prefix("sqlite://")
        .expect("a sqlite:// URL")
        .to_owned()
}

/// Overwrites the files of the SQLite ledger `ledger` (database, `-wal`, `-shm`) with junk of
/// the same size, in place, while a broker holds them open; returns the database's path.
pub fn overwrite_sqlite_ledger(ledger: &Ledger) -> String {
    use std::io::Write;
    let path = sqlite_path(ledger);
    for file in [path.clone(), format!("{path}-wal"), format!("{path}-shm")] {
        let len = std::fs::metadata(&file).map_or(0, |m| m.len());
        let junk = vec![0x5a; usize::try_from(len).expect("size")];
        if let Ok(mut f) = std::fs::OpenOptions::new().write(true).open(&file) {
            f.write_all(&junk).expect("overwritten");
        }
    }
    path
}

/// The broker binary with `serve`, a clean environment, JSON logs and `ledger`'s variables;
/// tests add the rest of their configuration as `GIROIDENT_BROKER_*` variables.
pub fn broker_command(ledger: &Ledger) -> std::process::Command {
    use secrecy::ExposeSecret;
    let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_giroident-broker"));
    command.arg("serve").env_clear().envs([
        (
            "GIROIDENT_BROKER_IDENTITIES__DATABASE_URL",
            ledger.database_url.expose_secret(),
        ),
        (
            "GIROIDENT_BROKER_IDENTITIES__PASSWORD_KEY",
            ledger.password_key.expose_secret(),
        ),
        ("GIROIDENT_BROKER_LOG__FORMAT", "json"),
    ]);
    command
}

/// A [`broker_command`] in front of the simulator at `sim_url` (both finAPI URLs, plain HTTP,
/// the simulator's demo client), listening on 127.0.0.1 port 0 (admin too), logging at info.
pub fn broker_command_on(ledger: &Ledger, sim_url: &str) -> std::process::Command {
    let mut command = broker_command(ledger);
    command.envs([
        ("GIROIDENT_BROKER_SERVER__LISTEN", "127.0.0.1:0"),
        ("GIROIDENT_BROKER_ADMIN__LISTEN", "127.0.0.1:0"),
        ("GIROIDENT_BROKER_FINAPI__ACCESS_URL", sim_url),
        ("GIROIDENT_BROKER_FINAPI__PROCESS_CONTROLLER_URL", sim_url),
        ("GIROIDENT_BROKER_FINAPI__ALLOW_INSECURE_HTTP", "true"),
        ("GIROIDENT_BROKER_FINAPI__CLIENT_ID", sim::DEMO_CLIENT_ID),
        (
            "GIROIDENT_BROKER_FINAPI__CLIENT_SECRET",
            sim::DEMO_CLIENT_SECRET,
        ),
        ("GIROIDENT_BROKER_LOG__FILTER", "info"),
    ]);
    command
}

/// Starts `command` (a [`broker_command`] listening on port 0) and returns the child and the
/// base URL from its "broker listening" log line (JSON or human-readable); its later log lines
/// go to `lines`, if given.
pub fn spawn_broker_binary(
    mut command: std::process::Command,
    lines: Option<std::sync::mpsc::Sender<String>>,
) -> (std::process::Child, String) {
    use std::io::{BufRead, BufReader};
    let mut child = command
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("the broker binary starts");
    let stderr = child.stderr.take().expect("stderr");
    let (addr_tx, addr_rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if let Ok(log) = serde_json::from_str::<Value>(&line)
                && log["message"] == "broker listening"
            {
                let _ = addr_tx.send(log["addr"].as_str().unwrap_or("").to_owned());
            } else if line.contains("broker listening") {
                // The human-readable format: `… broker listening addr=127.0.0.1:PORT …`.
                let addr = line
                    .split_whitespace()
                    .find_map(|word| word.strip_prefix("addr="));
                let _ = addr_tx.send(addr.unwrap_or("").to_owned());
            }
            if let Some(lines) = &lines {
                let _ = lines.send(line);
            }
        }
    });
    let addr = addr_rx
        .recv_timeout(Duration::from_secs(20))
        .expect("the broker logs its address");
    (child, format!("http://{addr}"))
}

/// `auth.callers` (as `GIROIDENT_BROKER_AUTH__CALLERS` takes it) with one caller, `name`, whose
/// key is [`TEST_API_KEY`] and who may use `flows` (a TOML array, e.g. `["access"]`).
pub fn test_caller(name: &str, flows: &str) -> String {
    let digest = giroident_broker::config::to_hex(&giroident_broker::config::sha256(
        TEST_API_KEY.as_bytes(),
    ));
    format!(r#"[{{name = "{name}", key_sha256 = "{digest}", flows = {flows}}}]"#)
}

/// `DELETE /api/v2/users`, as the simulator's stats name it.
pub const DELETE_USER: &str = "DELETE /api/v2/users";

/// Creates the caller's identity for `reference`, then sends four `DELETE
/// /identities/{reference}` at once while finAPI takes 300 ms per deletion, so that they are
/// likely to find it live together (the assertions hold as well if they do not). Asserts that
/// finAPI is asked to delete the user once, that the ledger records
/// one `deleted` event, and that every answer is one the README's table allows: `204`, `202`
/// with the record in `deleting` (another request is deleting it), or `404 IDENTITY_NOT_FOUND`
/// (it was deleted before the request looked).
pub async fn concurrent_deletes_delete_once(env: &TestEnv, reference: &str) {
    let created = env
        .start_session(json!({"flow": "access", "clientReference": reference}))
        .await;
    expect_created(created).await;
    env.sim.add_fault(sim::FaultRule {
        endpoint: DELETE_USER.into(),
        latency_ms: Some(300),
        ..sim::FaultRule::default()
    });
    let url = format!("{}/identities/{reference}", env.broker_url);
    let deletes = (0..4).map(|_| env.http.delete(&url).send());
    let mut statuses = Vec::new();
    for answer in futures_util::future::join_all(deletes).await {
        let answer = answer.expect("broker answers");
        let status = answer.status().as_u16();
        statuses.push(status);
        match status {
            204 => {}
            202 => {
                let record: Value = answer.json().await.expect("a record");
                assert_eq!(record["state"], "deleting", "{record}");
            }
            _ => {
                expect_problem(answer, 404, "IDENTITY_NOT_FOUND").await;
            }
        }
    }
    env.sim.clear_faults();
    assert!(statuses.contains(&204), "{statuses:?}");
    assert_eq!(
        env.all_calls(DELETE_USER),
        1,
        "{statuses:?} {:?}",
        env.sim.stats()
    );
    let record: Value = env
        .http
        .get(&url)
        .send()
        .await
        .expect("broker answers")
        .json()
        .await
        .expect("a record");
    assert_eq!(record["state"], "deleted", "{record}");
    let deleted = record["events"]
        .as_array()
        .expect("events")
        .iter()
        .filter(|e| e["kind"] == "deleted")
        .count();
    assert_eq!(deleted, 1, "{statuses:?} {record}");
}
