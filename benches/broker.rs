//! What the broker adds to the time finAPI takes.
//!
//! `cargo bench --bench broker` (add `-- --quick` for a run under two minutes). It builds the
//! release binary, starts the simulator and the broker as separate processes on 127.0.0.1, and
//! drives both with the same small load generator (one single-threaded tokio runtime, one
//! reqwest client per target, keep-alive): through the broker, and straight against the
//! simulator with the upstream calls the broker would make (the direct baseline). It prints a
//! Markdown report; `-- --out FILE` also writes it to FILE.
//!
//! Options (after `--`): `--quick`, `--seconds S` (per measured run), `--sessions N` (cap per
//! run), `--rounds N` (direct/broker pairs per point; the median pair is shown),
//! `--mem-sessions N` (sessions between the two memory readings), `--herd N`,
//! `--only NAME` (a section: ready, sweep, ledger, tracing, herd, refresh, memory, far), `--flow
//! access|standalone` and `--concurrency N` (sweep, ledger and far points), `--far-seconds S`,
//! `--latency MS` (50 or 200: one far latency) and `--alpn h2|http1` (one far ALPN offer).
//! The far and memory sections start the broker at its defaults but for the caller's rate
//! limit (a per-caller policy); the others raise its limits above the load, and log at
//! `BENCH_BROKER_LOG` (default `info`, the broker's default). Environment:
//! `BENCH_BROKER_WORKER_THREADS` (the broker's `server.worker_threads`), `BENCH_BROKER_PRELOAD`
//! (an `LD_PRELOAD` for the broker), `BENCH_LEDGER` (`sqlite`, the default: a fresh file per
//! broker, removed after; `postgres`: a throwaway PostgreSQL server started by the bench, a
//! fresh database per broker; `none`: a build without the identity ledger),
//! `BENCH_LEDGER_MAX_CONNECTIONS` (the ledger's pool size for this build),
//! `BENCH_LEDGER_SYNCHRONOUS` (this build's `identities.sqlite_synchronous`) and
//! `BENCH_BROKER_BIN` (another build of the broker, started against this build's simulator:
//! the broker the other sections measure instead of this build, and the ledger section's
//! baseline). Whether a build knows the ledger is asked of the build itself (`check-config`
//! with and without the `identities.*` variables), so an older build gets none of them.
//! The broker is configured with one caller whose API key the load generator sends as
//! `X-Api-Key`.

use std::cell::OnceCell;
use std::fmt::Write as _;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use reqwest::header::{HeaderMap, HeaderName, HeaderValue};
use serde::{Deserialize, Serialize};

const BIN: &str = env!("CARGO_BIN_EXE_giroident-broker");
const CLIENT_ID: &str = "demo-client";
const CLIENT_SECRET: &str = "demo-client-secret";
/// Linux reports process CPU time in these ticks per second (USER_HZ).
const TICKS_PER_SEC: f64 = 100.0;

struct Opts {
    quick: bool,
    seconds: f64,
    sessions: usize,
    rounds: usize,
    mem_sessions: usize,
    herd: usize,
    refresh_seconds: f64,
    only: Option<String>,
    flow: Option<String>,
    concurrency: Option<usize>,
    far_seconds: f64,
    latency: Option<u64>,
    alpn: Option<String>,
    api_key: String,
    out: Option<String>,
}

impl Opts {
    fn parse() -> Self {
        let mut args = std::env::args().skip(1);
        let mut opts = Self {
            quick: false,
            seconds: 1.5,
            sessions: 500_000,
            rounds: 9,
            mem_sessions: 100_000,
            herd: 1000,
            refresh_seconds: 12.0,
            only: None,
            flow: None,
            concurrency: None,
            far_seconds: 5.0,
            latency: None,
            alpn: None,
            api_key: BENCH_API_KEY.to_owned(),
            out: None,
        };
        let mut explicit = Vec::new();
        while let Some(arg) = args.next() {
            let mut value = || args.next().unwrap_or_else(|| panic!("{arg} needs a value"));
            match arg.as_str() {
                "--bench" => {} // added by `cargo bench`
                "--quick" => opts.quick = true,
                "--seconds" => opts.seconds = value().parse().expect("--seconds S"),
                "--sessions" => opts.sessions = value().parse().expect("--sessions N"),
                "--rounds" => opts.rounds = value().parse().expect("--rounds N"),
                "--mem-sessions" => opts.mem_sessions = value().parse().expect("--mem-sessions N"),
                "--herd" => opts.herd = value().parse().expect("--herd N"),
                "--only" => opts.only = Some(value()),
                "--flow" => opts.flow = Some(value()),
                "--concurrency" => {
                    opts.concurrency = Some(value().parse().expect("--concurrency N"))
                }
                "--far-seconds" => opts.far_seconds = value().parse().expect("--far-seconds S"),
                "--latency" => opts.latency = Some(value().parse().expect("--latency MS")),
                "--alpn" => opts.alpn = Some(value()),
                "--api-key" => opts.api_key = value(),
                "--out" => opts.out = Some(value()),
                other => panic!("unknown argument {other}"),
            }
            explicit.push(arg);
        }
        if opts.quick {
            let given = |name: &str| explicit.iter().any(|a| a == name);
            if !given("--seconds") {
                opts.seconds = 1.0;
            }
            if !given("--rounds") {
                opts.rounds = 3;
            }
            if !given("--mem-sessions") {
                opts.mem_sessions = 10_000;
            }
            opts.refresh_seconds = 6.0;
            if !given("--far-seconds") {
                opts.far_seconds = 3.0;
            }
        }
        opts
    }

    fn runs(&self, section: &str) -> bool {
        self.only.as_deref().is_none_or(|only| only == section)
    }
}

/// The API key of the benchmark's caller (the broker is configured with its SHA-256).
const BENCH_API_KEY: &str = "bench-api-key-0123456789abcdef";

/// The key the broker derives finAPI user passwords from (at least 32 bytes).
const BENCH_PASSWORD_KEY: &str = "bench-password-key-0123456789abcdef-0123456789";

/// The broker's configuration, all of it: the one place to change when the broker's config
/// grows. `ledger_url` is the identity ledger's database, `None` for a build without one (an
/// older build refuses the `identities.*` variables as unknown keys).
fn broker_env(
    listen: SocketAddr,
    sim_url: &str,
    ledger_url: Option<&str>,
) -> Vec<(&'static str, String)> {
    let digest = giroident_broker::config::to_hex(&giroident_broker::config::sha256(
        BENCH_API_KEY.as_bytes(),
    ));
    let mut env = vec![
        ("GIROIDENT_BROKER_SERVER__LISTEN", listen.to_string()),
        ("GIROIDENT_BROKER_ADMIN__LISTEN", "127.0.0.1:0".into()),
        (
            "GIROIDENT_BROKER_AUTH__CALLERS",
            format!(
                r#"[{{name = "bench", key_sha256 = "{digest}", flows = ["standalone", "access"]}}]"#
            ),
        ),
        // Limits far above what the load generator can send: the benchmark measures the
        // broker's overhead, not its protections.
        (
            "GIROIDENT_BROKER_LIMITS__CALLER_RATE_PER_SEC",
            "10000000".into(),
        ),
        ("GIROIDENT_BROKER_LIMITS__CALLER_BURST", "10000000".into()),
        ("GIROIDENT_BROKER_LIMITS__MAX_IN_FLIGHT", "100000".into()),
        ("GIROIDENT_BROKER_SERVER__DRAIN_SECS", "0".into()),
        ("GIROIDENT_BROKER_FINAPI__ACCESS_URL", sim_url.into()),
        (
            "GIROIDENT_BROKER_FINAPI__PROCESS_CONTROLLER_URL",
            sim_url.into(),
        ),
        (
            "GIROIDENT_BROKER_FINAPI__ALLOW_INSECURE_HTTP",
            "true".into(),
        ),
        ("GIROIDENT_BROKER_FINAPI__CLIENT_ID", CLIENT_ID.into()),
        (
            "GIROIDENT_BROKER_FINAPI__CLIENT_SECRET",
            CLIENT_SECRET.into(),
        ),
        ("GIROIDENT_BROKER_LOG__FILTER", broker_log_level()),
        ("RUST_LOG", broker_log_level()),
    ];
    if let Some(url) = ledger_url {
        env.push(("GIROIDENT_BROKER_IDENTITIES__DATABASE_URL", url.into()));
        env.push((
            "GIROIDENT_BROKER_IDENTITIES__PASSWORD_KEY",
            BENCH_PASSWORD_KEY.into(),
        ));
        // The ledger's pool size (`identities.database_max_connections`, default 8).
        if let Ok(n) = std::env::var("BENCH_LEDGER_MAX_CONNECTIONS") {
            env.push(("GIROIDENT_BROKER_IDENTITIES__DATABASE_MAX_CONNECTIONS", n));
        }
        // How an SQLite ledger syncs (`identities.sqlite_synchronous`, default `full`).
        if let Ok(sync) = std::env::var("BENCH_LEDGER_SYNCHRONOUS") {
            env.push(("GIROIDENT_BROKER_IDENTITIES__SQLITE_SYNCHRONOUS", sync));
        }
    }
    // Lets a run try another runtime for the broker only (`server.worker_threads`).
    if let Ok(workers) = std::env::var("BENCH_BROKER_WORKER_THREADS") {
        env.push(("GIROIDENT_BROKER_SERVER__WORKER_THREADS", workers));
    }
    // And another allocator, e.g. BENCH_BROKER_PRELOAD=/usr/lib/x86_64-linux-gnu/libmimalloc.so.
    if let Ok(preload) = std::env::var("BENCH_BROKER_PRELOAD") {
        env.push(("LD_PRELOAD", preload));
    }
    env
}

/// The log filter of the brokers [`broker_env`] configures: `BENCH_BROKER_LOG`, by default
/// `info`, the broker's own default (issue 15: measure the broker as deployed; `warn` gives
/// the figures of the runs before it, which logged nothing per session).
fn broker_log_level() -> String {
    std::env::var("BENCH_BROKER_LOG").unwrap_or_else(|_| "info".into())
}

/// Headers of every request the load generator sends to the broker: the caller's API key.
fn broker_headers(api_key: &str) -> HeaderMap {
    let mut headers = HeaderMap::new();
    let value = HeaderValue::from_str(api_key).expect("--api-key must be a valid header value");
    headers.insert(HeaderName::from_static("x-api-key"), value);
    headers
}

// ---------------------------------------------------------------------------------------------
// Child processes

/// A child process on a loopback port; killed when dropped (before its ledger's files go).
struct Proc {
    child: Child,
    addr: SocketAddr,
    ready_after: Duration,
    /// The directory of the broker's SQLite ledger, removed after the broker is killed.
    _ledger_files: Option<TempDir>,
}

impl Proc {
    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn status_field_kib(&self, field: &str) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .expect("/proc/PID/status");
        status
            .lines()
            .find_map(|l| l.strip_prefix(field))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or(0)
    }

    fn rss_kib(&self) -> u64 {
        self.status_field_kib("VmRSS:")
    }

    fn cpu_secs(&self) -> f64 {
        cpu_secs_of(&self.child.id().to_string())
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// utime + stime of a process ("self" for the load generator).
fn cpu_secs_of(pid: &str) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // The command name may hold spaces; fields are counted after its closing parenthesis.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    (ticks(11) + ticks(12)) / TICKS_PER_SEC
}

fn free_addr() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    listener.local_addr().expect("local addr")
}

/// Starts a process and waits (polling every 200 µs) until `path` answers 200.
fn spawn_ready(command: &mut Command, addr: SocketAddr, path: &str) -> Proc {
    command.stderr(Stdio::inherit());
    spawn_until(command, addr, path, || answers_200(addr, path))
}

/// Starts a process and waits (polling every 200 µs) until `ready` holds; `what` names the
/// wait in a panic.
fn spawn_until(
    command: &mut Command,
    addr: SocketAddr,
    what: &str,
    ready: impl Fn() -> bool,
) -> Proc {
    command.stdin(Stdio::null()).stdout(Stdio::null());
    let started = Instant::now();
    let child = command.spawn().expect("start giroident-broker");
    let mut proc = Proc {
        child,
        addr,
        ready_after: Duration::ZERO,
        _ledger_files: None,
    };
    while started.elapsed() < Duration::from_secs(10) {
        if ready() {
            proc.ready_after = started.elapsed();
            return proc;
        }
        if let Ok(Some(status)) = proc.child.try_wait() {
            panic!("giroident-broker exited early: {status}");
        }
        std::thread::sleep(Duration::from_micros(200));
    }
    panic!("{what} on {addr} was not ready within 10 s");
}

fn answers_200(addr: SocketAddr, path: &str) -> bool {
    let Ok(mut stream) = TcpStream::connect(addr) else {
        return false;
    };
    let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    let mut head = [0u8; 12];
    stream.write_all(request.as_bytes()).is_ok()
        && stream.read_exact(&mut head).is_ok()
        && head.ends_with(b" 200")
}

/// `giroident-broker sim` on `addr` with the bench's finAPI client, logging at `warn`.
fn sim_command(addr: SocketAddr) -> Command {
    let mut command = Command::new(BIN);
    command
        .env_clear()
        .env("RUST_LOG", "warn")
        .env("GIROIDENT_SIM_CLIENT_SECRET", CLIENT_SECRET)
        .args([
            "sim",
            "--listen",
            &addr.to_string(),
            "--client-id",
            CLIENT_ID,
            "--max-entries",
            &SIM_MAX_ENTRIES.to_string(),
        ]);
    command
}

/// The simulator's bound per table (`sim --max-entries`). Its default, a million, is reached by
/// the ledger section's nine rounds (every session creates a finAPI user): a full table answers
/// `500`, the brokers' circuits open, and rounds measure fast failures.
const SIM_MAX_ENTRIES: usize = 20_000_000;

fn spawn_sim(client_token_ttl_secs: u64) -> Proc {
    let addr = free_addr();
    let mut command = sim_command(addr);
    command.args([
        "--client-token-ttl-secs",
        &client_token_ttl_secs.to_string(),
    ]);
    spawn_ready(&mut command, addr, "/__sim/stats")
}

fn spawn_broker(sim: &Proc, spec: &BrokerSpec, setup: &Setup) -> Proc {
    spawn_broker_with(sim, spec, setup, &[])
}

/// [`spawn_broker`] with extra environment (the tracing section's `OTEL_*` variables).
fn spawn_broker_with(
    sim: &Proc,
    spec: &BrokerSpec,
    setup: &Setup,
    extra: &[(&str, String)],
) -> Proc {
    let addr = free_addr();
    let (url, files) = setup.ledger_db(spec.ledger);
    let mut command = Command::new(&spec.bin);
    command
        .env_clear()
        .envs(broker_env(addr, &sim.url(), url.as_deref()))
        .envs(extra.iter().map(|(k, v)| (*k, v.as_str())))
        .arg("serve")
        // Its log lines are written as they would be in a deployment, read by nobody; its
        // warnings and errors still reach the terminal when it logs at `warn` or above.
        .stderr(
            if matches!(broker_log_level().as_str(), "warn" | "error" | "off") {
                Stdio::inherit()
            } else {
                Stdio::null()
            },
        );
    let mut proc = spawn_until(&mut command, addr, "/readyz", || {
        answers_200(addr, "/readyz")
    });
    proc._ledger_files = files;
    proc
}

/// A directory under the system temp dir, removed with its contents on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(what: &str) -> Self {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let path = std::env::temp_dir().join(format!(
            "giroident-bench-{what}-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).expect("create a temp dir");
        Self(path)
    }

    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The identity ledger a broker is started with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Ledger {
    /// A build from before the ledger (issue 12): no `identities.*` variables.
    None,
    /// A fresh SQLite file per broker (WAL, `synchronous=FULL`: the broker's defaults).
    Sqlite,
    /// A fresh database per broker on the bench's own PostgreSQL server.
    Postgres,
}

impl Ledger {
    /// `BENCH_LEDGER`: `sqlite` (the default), `postgres` or `none`.
    fn from_env() -> Self {
        match std::env::var("BENCH_LEDGER").as_deref() {
            Err(_) | Ok("sqlite") => Self::Sqlite,
            Ok("postgres") => Self::Postgres,
            Ok("none") => Self::None,
            Ok(other) => panic!("BENCH_LEDGER={other}: expected sqlite, postgres or none"),
        }
    }

    fn name(self) -> &'static str {
        match self {
            Self::None => "no ledger",
            Self::Sqlite => "SQLite",
            Self::Postgres => "PostgreSQL",
        }
    }
}

/// A build of the broker and the ledger it is started with.
#[derive(Clone, Debug)]
struct BrokerSpec {
    bin: String,
    ledger: Ledger,
}

impl BrokerSpec {
    /// `bin` with `wanted`, or with no ledger if the build does not know the ledger.
    fn for_build(bin: String, wanted: Ledger) -> Self {
        let ledger = if wanted != Ledger::None && !knows_ledger(&bin) {
            eprintln!("{bin} has no identity ledger: started without `identities.*` variables");
            Ledger::None
        } else {
            wanted
        };
        Self { bin, ledger }
    }
}

/// Whether the build at `bin` knows the identity ledger: its `check-config` accepts the bench's
/// configuration with the `identities.*` variables (a build without the ledger refuses them as
/// unknown keys, and accepts the configuration without them). `check-config` opens no database.
fn knows_ledger(bin: &str) -> bool {
    let check = |ledger_url: Option<&str>| {
        Command::new(bin)
            .env_clear()
            .envs(broker_env(free_addr(), "http://127.0.0.1:9", ledger_url))
            .arg("check-config")
            .output()
            .unwrap_or_else(|e| panic!("cannot run {bin}: {e}"))
    };
    let with = check(Some("sqlite:///nonexistent/bench-probe.db"));
    if with.status.success() {
        return true;
    }
    let without = check(None);
    if without.status.success() {
        return false;
    }
    panic!(
        "{bin} check-config refuses the bench's configuration with the ledger ({}) and without \
         it ({})",
        String::from_utf8_lossy(&with.stderr).trim(),
        String::from_utf8_lossy(&without.stderr).trim()
    );
}

/// What the sections start brokers with.
struct Setup {
    /// The broker the ready, sweep, herd, refresh and memory sections measure:
    /// `BENCH_BROKER_BIN` or this build, with `BENCH_LEDGER`'s ledger if the build has one.
    tested: BrokerSpec,
    /// `BENCH_BROKER_BIN`, if given, with the ledger it knows: the ledger section's baseline.
    baseline: Option<BrokerSpec>,
    /// The PostgreSQL server, started on first use; the error says why it could not start.
    pg: OnceCell<Result<pg::PgServer, String>>,
    /// Databases made on the PostgreSQL server so far.
    databases: std::cell::Cell<u32>,
}

impl Setup {
    fn from_env() -> Self {
        let ledger = Ledger::from_env();
        let baseline = std::env::var("BENCH_BROKER_BIN")
            .ok()
            .map(|bin| BrokerSpec::for_build(bin, ledger));
        let tested = match &baseline {
            Some(spec) => spec.clone(),
            None => BrokerSpec {
                bin: BIN.to_owned(),
                ledger,
            },
        };
        Self {
            tested,
            baseline,
            pg: OnceCell::new(),
            databases: std::cell::Cell::new(0),
        }
    }

    fn pg(&self) -> Result<&pg::PgServer, &str> {
        self.pg
            .get_or_init(|| {
                eprintln!("starting PostgreSQL…");
                // The harness panics with the reason (the missing Debian package, the log).
                std::panic::catch_unwind(|| pg::PgServer::start_blocking(true)).map_err(|panic| {
                    panic
                        .downcast_ref::<String>()
                        .cloned()
                        .or_else(|| panic.downcast_ref::<&str>().map(|s| (*s).to_owned()))
                        .unwrap_or_else(|| "PostgreSQL did not start".to_owned())
                })
            })
            .as_ref()
            .map_err(String::as_str)
    }

    /// The database URL for a new broker with `ledger`, and the directory to remove after it.
    fn ledger_db(&self, ledger: Ledger) -> (Option<String>, Option<TempDir>) {
        match ledger {
            Ledger::None => (None, None),
            Ledger::Sqlite => {
                let dir = TempDir::new("ledger");
                let url = format!("sqlite://{}/identities.db", dir.path().display());
                (Some(url), Some(dir))
            }
            Ledger::Postgres => {
                let server = self.pg().unwrap_or_else(|e| panic!("{e}"));
                let n = self.databases.get();
                self.databases.set(n + 1);
                (Some(server.create_database(&format!("bench_{n}"))), None)
            }
        }
    }
}

/// The tests' throwaway PostgreSQL server (initdb and `pg_ctl` from the machine's server
/// binaries, trust authentication, 127.0.0.1 and a free port, run as the `postgres` user when
/// root), started here with PostgreSQL's durable defaults (`fsync`, `synchronous_commit`,
/// `full_page_writes` on), so that the figures are those of a ledger that survives a crash.
#[allow(dead_code)] // the tests' async helpers are not used here
#[path = "../tests/common/pg.rs"]
mod pg;

// ---------------------------------------------------------------------------------------------
// Load

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Flow {
    Access,
    /// The access flow with a new `clientReference` per session: each creates an identity
    /// after looking the reference up in the ledger.
    AccessRef,
    Standalone,
    /// Access and standalone in turn (memory test).
    Mixed,
}

impl Flow {
    fn name(self) -> &'static str {
        match self {
            Self::Access => "access",
            Self::AccessRef => "access + clientReference",
            Self::Standalone => "standalone",
            Self::Mixed => "mixed",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Via {
    Direct,
    Broker,
}

/// Where the load goes and how.
struct Target {
    http: reqwest::Client,
    broker: String,
    sim: String,
    headers: HeaderMap,
    /// The client token of the direct access flow, fetched once per run.
    client_token: Option<String>,
}

fn http_client() -> reqwest::Client {
    reqwest::Client::builder()
        .pool_max_idle_per_host(usize::MAX)
        .pool_idle_timeout(Duration::from_secs(90))
        .tcp_nodelay(true)
        .build()
        .expect("reqwest client")
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct NewUserBody<'a> {
    id: &'a str,
    password: &'a str,
    is_auto_update_enabled: bool,
}

#[derive(Deserialize)]
struct CreatedUser {
    id: String,
}

#[derive(Deserialize)]
struct TokenBody {
    access_token: String,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct NewProcessBody<'a> {
    client_id: &'a str,
    client_secret: &'a str,
    client_references: [Reference<'a>; 1],
    process_id: &'a str,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Reference<'a> {
    client_reference: &'a str,
}

#[derive(Deserialize)]
struct CreatedProcesses {
    processes: Vec<CreatedProcess>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct CreatedProcess {
    process_token: String,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Exchanged {
    access_token: String,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Session {
    access_token: String,
}

type Outcome = Result<(), String>;

async fn expect(
    response: reqwest::Result<reqwest::Response>,
    status: u16,
) -> Result<reqwest::Response, String> {
    let response = response.map_err(|e| format!("transport: {e}"))?;
    if response.status().as_u16() == status {
        Ok(response)
    } else {
        let got = response.status();
        let body = response.text().await.unwrap_or_default();
        Err(format!(
            "{got}: {}",
            body.chars().take(200).collect::<String>()
        ))
    }
}

async fn json<T: serde::de::DeserializeOwned>(response: reqwest::Response) -> Result<T, String> {
    response.json().await.map_err(|e| format!("body: {e}"))
}

impl Target {
    async fn session(&self, flow: Flow, via: Via, n: usize) -> Outcome {
        let flow = match flow {
            Flow::Mixed if n.is_multiple_of(2) => Flow::Access,
            Flow::Mixed => Flow::Standalone,
            other => other,
        };
        match via {
            Via::Broker => self.via_broker(flow, n).await,
            Via::Direct if matches!(flow, Flow::Access | Flow::AccessRef) => {
                self.direct_access().await
            }
            Via::Direct => self.direct_standalone(n).await,
        }
    }

    async fn via_broker(&self, flow: Flow, n: usize) -> Outcome {
        let body = match flow {
            Flow::Access => r#"{"flow":"access"}"#.to_owned(),
            Flow::AccessRef => {
                // Unique over the whole bench process, so no session finds an identity to
                // reuse.
                static NEXT_REFERENCE: AtomicU64 = AtomicU64::new(0);
                let reference = NEXT_REFERENCE.fetch_add(1, Ordering::Relaxed);
                format!(r#"{{"flow":"access","clientReference":"bench-{reference}"}}"#)
            }
            _ => format!(r#"{{"flow":"standalone","clientReference":"bench-{n}"}}"#),
        };
        let response = self
            .http
            .post(format!("{}/kyc-sessions", self.broker))
            .headers(self.headers.clone())
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await;
        let session: Session = json(expect(response, 201).await?).await?;
        check_token(&session.access_token)
    }

    /// What the broker does for the access flow, with the client token already at hand.
    async fn direct_access(&self) -> Outcome {
        let client_token = self.client_token.as_deref().ok_or("no client token")?;
        let id = format!("gib-{}", uuid::Uuid::new_v4().simple());
        let password = uuid::Uuid::new_v4().simple().to_string();
        let request_id = uuid::Uuid::new_v4().to_string();
        let body = NewUserBody {
            id: &id,
            password: &password,
            is_auto_update_enabled: false,
        };
        let response = self
            .http
            .post(format!("{}/api/v2/users", self.sim))
            .bearer_auth(client_token)
            .header("x-request-id", &request_id)
            .json(&body)
            .send()
            .await;
        let user: CreatedUser = json(expect(response, 201).await?).await?;
        let form = [
            ("grant_type", "password"),
            ("username", user.id.as_str()),
            ("password", password.as_str()),
            ("client_id", CLIENT_ID),
            ("client_secret", CLIENT_SECRET),
        ];
        let response = self
            .http
            .post(format!("{}/api/v2/oauth/token", self.sim))
            .header("x-request-id", &request_id)
            .form(&form)
            .send()
            .await;
        let token: TokenBody = json(expect(response, 200).await?).await?;
        check_token(&token.access_token)
    }

    /// What the broker does for the standalone flow.
    async fn direct_standalone(&self, n: usize) -> Outcome {
        let reference = format!("bench-{n}");
        let request_id = uuid::Uuid::new_v4().to_string();
        let body = NewProcessBody {
            client_id: CLIENT_ID,
            client_secret: CLIENT_SECRET,
            client_references: [Reference {
                client_reference: &reference,
            }],
            process_id: "GIROIDENT",
        };
        let response = self
            .http
            .post(format!("{}/api/v1/processes", self.sim))
            .header("x-request-id", &request_id)
            .json(&body)
            .send()
            .await;
        let created: CreatedProcesses = json(expect(response, 201).await?).await?;
        let token = &created.processes.first().ok_or("no process")?.process_token;
        let response = self
            .http
            .get(format!(
                "{}/api/v1/processes/{token}?invalidate=true",
                self.sim
            ))
            .header("x-request-id", &request_id)
            .send()
            .await;
        let exchanged: Exchanged = json(expect(response, 200).await?).await?;
        check_token(&exchanged.access_token)
    }

    async fn fetch_client_token(&mut self) {
        let form = [
            ("grant_type", "client_credentials"),
            ("client_id", CLIENT_ID),
            ("client_secret", CLIENT_SECRET),
        ];
        let response = self
            .http
            .post(format!("{}/api/v2/oauth/token", self.sim))
            .form(&form)
            .send()
            .await;
        let token: TokenBody = json(expect(response, 200).await.expect("client token"))
            .await
            .expect("client token body");
        self.client_token = Some(token.access_token);
    }
}

fn check_token(token: &str) -> Outcome {
    if token.is_empty() {
        Err("empty access token".into())
    } else {
        Ok(())
    }
}

/// One request's start (since the run began) and latency, in microseconds.
#[derive(Clone, Copy)]
struct Sample {
    start_us: u64,
    latency_us: u64,
}

struct RunResult {
    samples: Vec<Sample>,
    errors: usize,
    first_error: Option<String>,
    elapsed: Duration,
    /// CPU seconds per process during the run: generator, broker, simulator.
    cpu: [f64; 3],
}

impl RunResult {
    fn rate(&self) -> f64 {
        self.samples.len() as f64 / self.elapsed.as_secs_f64()
    }

    fn latencies(&self) -> Latencies {
        Latencies::of(self.samples.iter().map(|s| s.latency_us))
    }

    /// CPU microseconds per session of the generator, broker and simulator.
    fn cpu_per_session(&self) -> [f64; 3] {
        let n = self.samples.len().max(1) as f64;
        self.cpu.map(|secs| secs * 1e6 / n)
    }
}

#[derive(Clone, Copy, Default)]
struct Latencies {
    n: usize,
    p50: f64,
    p99: f64,
    max: f64,
}

impl Latencies {
    /// Percentiles (nearest rank) in milliseconds.
    fn of(values: impl Iterator<Item = u64>) -> Self {
        let mut v: Vec<u64> = values.collect();
        if v.is_empty() {
            return Self::default();
        }
        v.sort_unstable();
        let rank = |q: f64| v[((q * v.len() as f64).ceil() as usize).clamp(1, v.len()) - 1];
        Self {
            n: v.len(),
            p50: rank(0.50) as f64 / 1e3,
            p99: rank(0.99) as f64 / 1e3,
            max: *v.last().unwrap_or(&0) as f64 / 1e3,
        }
    }
}

/// Runs `concurrency` workers until `max_sessions` sessions have started or `max_time` passed.
async fn run_load(
    target: &Arc<Target>,
    procs: (&Proc, &Proc),
    flow: Flow,
    via: Via,
    concurrency: usize,
    max_sessions: usize,
    max_time: Duration,
) -> RunResult {
    let next = Arc::new(AtomicUsize::new(0));
    let cpu_before = [cpu_secs_of("self"), procs.0.cpu_secs(), procs.1.cpu_secs()];
    let started = Instant::now();
    let mut workers = Vec::with_capacity(concurrency);
    for _ in 0..concurrency {
        let target = target.clone();
        let next = next.clone();
        workers.push(tokio::spawn(async move {
            let mut samples = Vec::new();
            let mut errors = 0;
            let mut first_error = None;
            loop {
                let n = next.fetch_add(1, Ordering::Relaxed);
                if n >= max_sessions || started.elapsed() >= max_time {
                    break;
                }
                let t0 = Instant::now();
                match target.session(flow, via, n).await {
                    Ok(()) => samples.push(Sample {
                        start_us: (t0 - started).as_micros() as u64,
                        latency_us: t0.elapsed().as_micros() as u64,
                    }),
                    Err(e) => {
                        errors += 1;
                        first_error.get_or_insert(e);
                    }
                }
            }
            (samples, errors, first_error)
        }));
    }
    let mut result = RunResult {
        samples: Vec::new(),
        errors: 0,
        first_error: None,
        elapsed: Duration::ZERO,
        cpu: [0.0; 3],
    };
    for worker in workers {
        let (samples, errors, first_error) = worker.await.expect("worker");
        result.samples.extend(samples);
        result.errors += errors;
        if result.first_error.is_none() {
            result.first_error = first_error;
        }
    }
    result.elapsed = started.elapsed();
    let cpu_after = [cpu_secs_of("self"), procs.0.cpu_secs(), procs.1.cpu_secs()];
    result.cpu = [0, 1, 2].map(|i| cpu_after[i] - cpu_before[i]);
    if let Some(e) = &result.first_error {
        eprintln!(
            "  {} errors in {} {:?} c={concurrency}; first: {e}",
            result.errors,
            flow.name(),
            via
        );
    }
    result
}

// ---------------------------------------------------------------------------------------------
// Sections

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}

fn machine() -> String {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .map_or("unknown", |m| m.trim_start_matches([' ', '\t', ':']));
    let cores = std::thread::available_parallelism().map_or(0, usize::from);
    let mem = std::fs::read_to_string("/proc/meminfo")
        .unwrap_or_default()
        .lines()
        .next()
        .unwrap_or("")
        .split_whitespace()
        .nth(1)
        .and_then(|kib| kib.parse::<u64>().ok())
        .map_or(0, |kib| kib / 1024 / 1024);
    format!("{cores} cores ({model}), {mem} GiB RAM")
}

async fn sim_stat(http: &reqwest::Client, sim: &Proc, key: &str, status: &str) -> u64 {
    let stats: serde_json::Value = http
        .get(format!("{}/__sim/stats", sim.url()))
        .send()
        .await
        .expect("sim stats")
        .json()
        .await
        .expect("sim stats body");
    stats[key][status].as_u64().unwrap_or(0)
}

async fn reset_sim_stats(http: &reqwest::Client, sim: &Proc) {
    http.delete(format!("{}/__sim/stats", sim.url()))
        .send()
        .await
        .expect("reset sim stats");
}

const CLIENT_CREDENTIALS: &str = "POST /api/v2/oauth/token client_credentials";

fn ready_section(setup: &Setup, report: &mut String, runs: usize) {
    let sim = spawn_sim(3600);
    let mut times: Vec<f64> = (0..runs)
        .map(|_| {
            spawn_broker(&sim, &setup.tested, setup)
                .ready_after
                .as_secs_f64()
                * 1e3
        })
        .collect();
    times.sort_by(f64::total_cmp);
    let median = times[times.len() / 2];
    let max = times[times.len() - 1];
    let _ = writeln!(
        report,
        "\n### Start to `/readyz` 200\n\n{runs} fresh starts (spawn of the release binary to the \
         first 200, polled every 0.2 ms): median **{median:.1} ms**, max {max:.1} ms \
         (simulator: {:.1} ms). Target ≤ 100 ms: **{}**.",
        sim.ready_after.as_secs_f64() * 1e3,
        verdict(max <= 100.0)
    );
}

/// One direct run and one broker run, back to back.
struct Pair {
    direct: RunResult,
    broker: RunResult,
}

impl Pair {
    fn ratio(&self) -> f64 {
        self.broker.rate() / self.direct.rate()
    }

    /// The throughput ratio two idle cores would allow: direct CPU time per session (generator
    /// and simulator) over the broker path's (generator, broker and simulator). Much less
    /// sensitive to other load on the machine than the measured ratio.
    fn cpu_ratio(&self) -> f64 {
        let (d, b) = (self.direct.cpu_per_session(), self.broker.cpu_per_session());
        (d[0] + d[2]) / (b[0] + b[1] + b[2])
    }

    /// Broker minus direct latency at p50 and p99, in ms.
    fn added(&self) -> (f64, f64) {
        let (d, b) = (self.direct.latencies(), self.broker.latencies());
        (b.p50 - d.p50, b.p99 - d.p99)
    }
}

struct SweepRow {
    flow: Flow,
    concurrency: usize,
    /// Sorted by throughput ratio.
    pairs: Vec<Pair>,
    load: String,
}

impl SweepRow {
    /// The pair with the median ratio: the row's figures come from it.
    fn median(&self) -> &Pair {
        &self.pairs[self.pairs.len() / 2]
    }

    /// Median over pairs of the latency the broker adds at p50 and p99.
    fn median_added(&self) -> (f64, f64) {
        let mut p50: Vec<f64> = self.pairs.iter().map(|p| p.added().0).collect();
        let mut p99: Vec<f64> = self.pairs.iter().map(|p| p.added().1).collect();
        p50.sort_by(f64::total_cmp);
        p99.sort_by(f64::total_cmp);
        (p50[p50.len() / 2], p99[p99.len() / 2])
    }
}

async fn sweep_section(
    opts: &Opts,
    headers: &HeaderMap,
    setup: &Setup,
    report: &mut String,
) -> Vec<SweepRow> {
    let mut rows = Vec::new();
    let max_time = Duration::from_secs_f64(opts.seconds);
    for flow in [Flow::Access, Flow::Standalone] {
        for concurrency in [1, 16, 64] {
            if opts.flow.as_deref().is_some_and(|f| f != flow.name())
                || opts.concurrency.is_some_and(|c| c != concurrency)
            {
                continue;
            }
            // Fresh processes per point, so the simulator's tables start empty for each.
            let sim = spawn_sim(3600);
            let broker = spawn_broker(&sim, &setup.tested, setup);
            let mut target = Target {
                http: http_client(),
                broker: broker.url(),
                sim: sim.url(),
                headers: headers.clone(),
                client_token: None,
            };
            target.fetch_client_token().await;
            let target = Arc::new(target);
            let procs = (&broker, &sim);
            let warmup = Duration::from_millis(500);
            for via in [Via::Direct, Via::Broker] {
                run_load(&target, procs, flow, via, concurrency, 2000, warmup).await;
            }
            let load_before = loadavg();
            let mut pairs = Vec::new();
            for round in 0..opts.rounds.max(1) {
                // Alternate the order so that a drift in the machine's load favours neither.
                let order = if round.is_multiple_of(2) {
                    [Via::Direct, Via::Broker]
                } else {
                    [Via::Broker, Via::Direct]
                };
                let mut runs = Vec::new();
                for via in order {
                    let r = run_load(
                        &target,
                        procs,
                        flow,
                        via,
                        concurrency,
                        opts.sessions,
                        max_time,
                    )
                    .await;
                    runs.push((via, r));
                }
                let (mut direct, mut broker_run) = (None, None);
                for (via, r) in runs {
                    match via {
                        Via::Direct => direct = Some(r),
                        Via::Broker => broker_run = Some(r),
                    }
                }
                if let (Some(direct), Some(broker)) = (direct, broker_run) {
                    pairs.push(Pair { direct, broker });
                }
            }
            pairs.sort_by(|a, b| a.ratio().total_cmp(&b.ratio()));
            let row = SweepRow {
                flow,
                concurrency,
                pairs,
                load: format!("{load_before} → {}", loadavg()),
            };
            eprintln!(
                "  {} c={concurrency}: direct {:.0}/s, broker {:.0}/s (median pair)",
                flow.name(),
                row.median().direct.rate(),
                row.median().broker.rate()
            );
            rows.push(row);
        }
    }
    let _ = writeln!(
        report,
        "\n### Throughput and latency\n\nPer point: fresh simulator and broker, 0.5 s warm-up \
         of each path, then {} pair(s) of runs, direct and broker back to back (order \
         alternating), {} s or {} sessions each. The row shows the pair with the median \
         throughput ratio; the range of ratios and the median over pairs of the added latency \
         follow. The CPU-time ratio is what two idle cores would allow: (generator + simulator CPU \
         per direct session) ÷ (generator + broker + simulator CPU per broker session). Latency \
         in ms.\n\n\
         | flow | conc. | direct sess/s | broker sess/s | **broker ÷ direct** (range) | CPU-time ratio | direct p50 / p99 / max | broker p50 / p99 / max | **broker − direct** p50 / p99 (median over pairs) | CPU µs/session gen · broker · sim (direct → broker) | errors | load avg |\n\
         |---|---:|---:|---:|---:|---:|---|---|---|---|---:|---|",
        opts.rounds, opts.seconds, opts.sessions
    );
    for row in &rows {
        let pair = row.median();
        let (d, b) = (pair.direct.latencies(), pair.broker.latencies());
        let (dc, bc) = (pair.direct.cpu_per_session(), pair.broker.cpu_per_session());
        let (add50, add99) = row.median_added();
        let errors: usize = row
            .pairs
            .iter()
            .map(|p| p.direct.errors + p.broker.errors)
            .sum();
        let _ = writeln!(
            report,
            "| {} | {} | {:.0} | {:.0} | **{:.2}** ({:.2}–{:.2}) | {:.2} | {:.2} / {:.2} / {:.1} | {:.2} / {:.2} / {:.1} | **{:+.2} / {:+.2}** | {:.0} · – · {:.0} → {:.0} · {:.0} · {:.0} | {} | {} |",
            row.flow.name(),
            row.concurrency,
            pair.direct.rate(),
            pair.broker.rate(),
            pair.ratio(),
            row.pairs[0].ratio(),
            row.pairs[row.pairs.len() - 1].ratio(),
            pair.cpu_ratio(),
            d.p50,
            d.p99,
            d.max,
            b.p50,
            b.p99,
            b.max,
            add50,
            add99,
            dc[0],
            dc[2],
            bc[0],
            bc[1],
            bc[2],
            errors,
            row.load,
        );
    }
    rows
}

/// One broker of the ledger comparison and the flow it is driven with.
struct LedgerVariant {
    label: String,
    spec: BrokerSpec,
    flow: Flow,
}

fn median(mut values: Vec<f64>) -> f64 {
    if values.is_empty() {
        return f64::NAN;
    }
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

/// The figures of one variant at one point, medians over rounds; the comparisons with the
/// baseline are taken per round (the runs of one round are back to back) and then the median.
struct LedgerRow {
    concurrency: usize,
    label: String,
    ledger: Ledger,
    flow: Flow,
    rate: f64,
    p50: f64,
    p99: f64,
    broker_cpu_us: f64,
    /// Throughput ÷ the baseline's: median, min, max.
    ratio: Option<(f64, f64, f64)>,
    /// Minus the baseline's p50 and p99 (ms).
    delta: Option<(f64, f64)>,
    sessions: usize,
    errors: usize,
}

/// The access flow through the previous build (`BENCH_BROKER_BIN`, no ledger), through this
/// build with SQLite and with PostgreSQL, and with a `clientReference` per session, at
/// concurrency 1, 16 and 64; rounds interleave the brokers. Returns the verdicts.
async fn ledger_section(
    opts: &Opts,
    headers: &HeaderMap,
    setup: &Setup,
    report: &mut String,
) -> Vec<String> {
    let mut notes = Vec::new();
    let mut variants = Vec::new();
    if let Some(baseline) = &setup.baseline {
        variants.push(LedgerVariant {
            label: format!("previous build, {}", baseline.ledger.name()),
            spec: baseline.clone(),
            flow: Flow::Access,
        });
    } else {
        notes.push(
            "No previous build given (`BENCH_BROKER_BIN`): no baseline, no ratios.".to_owned(),
        );
    }
    let this = |ledger| BrokerSpec {
        bin: BIN.to_owned(),
        ledger,
    };
    variants.push(LedgerVariant {
        label: "this build, SQLite".into(),
        spec: this(Ledger::Sqlite),
        flow: Flow::Access,
    });
    match setup.pg() {
        Ok(server) => variants.push(LedgerVariant {
            label: format!("this build, PostgreSQL {}", server.version()),
            spec: this(Ledger::Postgres),
            flow: Flow::Access,
        }),
        Err(e) => notes.push(format!("No PostgreSQL rows: {e}.")),
    }
    variants.push(LedgerVariant {
        label: "this build, SQLite, new `clientReference` each".into(),
        spec: this(Ledger::Sqlite),
        flow: Flow::AccessRef,
    });
    let has_baseline = setup.baseline.is_some();
    let max_time = Duration::from_secs_f64(opts.seconds);
    let mut rows = Vec::new();
    for concurrency in [1, 16, 64] {
        if opts.concurrency.is_some_and(|c| c != concurrency) {
            continue;
        }
        // Fresh processes and databases per point; all brokers up at once, so that the rounds
        // can interleave them.
        let sim = spawn_sim(3600);
        let brokers: Vec<Proc> = variants
            .iter()
            .map(|v| spawn_broker(&sim, &v.spec, setup))
            .collect();
        let targets: Vec<Arc<Target>> = brokers
            .iter()
            .map(|broker| {
                Arc::new(Target {
                    http: http_client(),
                    broker: broker.url(),
                    sim: sim.url(),
                    headers: headers.clone(),
                    client_token: None,
                })
            })
            .collect();
        for (i, v) in variants.iter().enumerate() {
            let procs = (&brokers[i], &sim);
            let warmup = Duration::from_millis(500);
            run_load(
                &targets[i],
                procs,
                v.flow,
                Via::Broker,
                concurrency,
                2000,
                warmup,
            )
            .await;
        }
        let mut runs: Vec<Vec<RunResult>> = variants.iter().map(|_| Vec::new()).collect();
        for round in 0..opts.rounds.max(1) {
            // Each round starts with the next broker, so that a drift in the machine's load
            // favours none of them.
            for k in 0..variants.len() {
                let i = (k + round) % variants.len();
                let procs = (&brokers[i], &sim);
                let run = run_load(
                    &targets[i],
                    procs,
                    variants[i].flow,
                    Via::Broker,
                    concurrency,
                    opts.sessions,
                    max_time,
                )
                .await;
                runs[i].push(run);
            }
        }
        for (i, v) in variants.iter().enumerate() {
            let per_round = |f: &dyn Fn(&RunResult) -> f64| runs[i].iter().map(f).collect();
            let rates: Vec<f64> = per_round(&|r| r.rate());
            let p50s: Vec<f64> = per_round(&|r| r.latencies().p50);
            let p99s: Vec<f64> = per_round(&|r| r.latencies().p99);
            let against_baseline = has_baseline && i > 0;
            let ratios: Vec<f64> = runs[i]
                .iter()
                .zip(&runs[0])
                .map(|(r, b)| r.rate() / b.rate())
                .collect();
            let base_p50s: Vec<f64> = runs[0].iter().map(|r| r.latencies().p50).collect();
            let base_p99s: Vec<f64> = runs[0].iter().map(|r| r.latencies().p99).collect();
            let row = LedgerRow {
                concurrency,
                label: v.label.clone(),
                ledger: v.spec.ledger,
                flow: v.flow,
                rate: median(rates),
                p50: median(p50s.clone()),
                p99: median(p99s.clone()),
                broker_cpu_us: median(per_round(&|r| r.cpu_per_session()[1])),
                ratio: against_baseline.then(|| {
                    let min = ratios.iter().copied().fold(f64::INFINITY, f64::min);
                    let max = ratios.iter().copied().fold(0.0, f64::max);
                    (median(ratios.clone()), min, max)
                }),
                delta: against_baseline.then(|| {
                    let d = |mine: &[f64], base: &[f64]| {
                        median(mine.iter().zip(base).map(|(m, b)| m - b).collect())
                    };
                    (d(&p50s, &base_p50s), d(&p99s, &base_p99s))
                }),
                sessions: runs[i].iter().map(|r| r.samples.len()).sum(),
                errors: runs[i].iter().map(|r| r.errors).sum(),
            };
            eprintln!(
                "  ledger c={concurrency} {}: {:.0}/s, p50 {:.2} ms",
                row.label, row.rate, row.p50
            );
            rows.push(row);
        }
    }
    let pool = std::env::var("BENCH_LEDGER_MAX_CONNECTIONS").unwrap_or_else(|_| "8".into());
    let _ = writeln!(
        report,
        "\n### Identity ledger (issue 12)\n\nThe access flow through each broker; per point a \
         fresh simulator, all brokers started side by side (a fresh SQLite file or PostgreSQL \
         database each), 0.5 s warm-up each, then {} round(s) of one {} s run per broker, back to \
         back, each round starting with the next broker. Figures are medians over rounds; ratios \
         and differences are taken per round against the previous build's run of the same round, \
         then the median (range of the ratios in brackets). SQLite: the broker's settings (WAL, \
         `synchronous=FULL`, a pool of {pool}), the file in the temp dir. PostgreSQL: a local \
         server over TCP on 127.0.0.1 with its durable defaults (`fsync`, `synchronous_commit` \
         on), a pool of {pool}; its own CPU time is not in the broker column. Latency in ms.{}\n\n\
         | conc. | broker | sess/s | **÷ previous** (range) | p50 | p99 | **p50 − previous** | p99 − previous | broker CPU µs/session | sessions | errors |\n\
         |---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        opts.rounds.max(1),
        opts.seconds,
        notes.iter().map(|n| format!(" {n}")).collect::<String>()
    );
    for row in &rows {
        let ratio = row.ratio.map_or("–".to_owned(), |(m, lo, hi)| {
            format!("**{m:.2}** ({lo:.2}–{hi:.2})")
        });
        let (d50, d99) = row
            .delta
            .map_or(("–".to_owned(), "–".to_owned()), |(a, b)| {
                (format!("**{a:+.2}**"), format!("{b:+.2}"))
            });
        let _ = writeln!(
            report,
            "| {} | {} | {:.0} | {ratio} | {:.2} | {:.2} | {d50} | {d99} | {:.0} | {} | {} |",
            row.concurrency,
            row.label,
            row.rate,
            row.p50,
            row.p99,
            row.broker_cpu_us,
            row.sessions,
            row.errors
        );
    }
    let mut verdicts = Vec::new();
    let at_16 = |ledger| {
        rows.iter()
            .find(|r| r.concurrency == 16 && r.ledger == ledger && r.flow == Flow::Access)
    };
    // Failed sessions (fast 503s while a circuit is open, a full simulator) would be measured
    // instead of the ledger: a run with any gives no verdict.
    let failed: usize = [Ledger::None, Ledger::Sqlite]
        .into_iter()
        .filter_map(at_16)
        .map(|r| r.errors)
        .sum();
    match at_16(Ledger::Sqlite).and_then(|r| Some((r, r.ratio?, r.delta?))) {
        Some(_) if failed > 0 => verdicts.push(format!(
            "ledger: no verdict: {failed} sessions failed at c=16 through the previous build or \
             SQLite (the first error of each run is printed above)"
        )),
        Some((row, (ratio, _, _), (d50, _))) => verdicts.push(format!(
            "ledger: SQLite at c=16 {:.0} sessions/s = {ratio:.2} × the previous build (target ≥ \
             0.70), p50 {d50:+.2} ms (target ≤ +1): {}",
            row.rate,
            verdict(ratio >= 0.7 && d50 <= 1.0)
        )),
        None => verdicts.push(
            "ledger: no SQLite c=16 figures against a previous build (`BENCH_BROKER_BIN`)"
                .to_owned(),
        ),
    }
    if let Some(row) = at_16(Ledger::Postgres) {
        let against = match (row.ratio, row.delta) {
            (Some((ratio, _, _)), Some((d50, _))) => {
                format!(" = {ratio:.2} × the previous build, p50 {d50:+.2} ms")
            }
            _ => String::new(),
        };
        verdicts.push(format!(
            "ledger: PostgreSQL at c=16 {:.0} sessions/s{against}, p50 {:.2} ms, p99 {:.2} ms \
             (no target; reported)",
            row.rate, row.p50, row.p99
        ));
    }
    verdicts
}

/// A local OTLP/HTTP receiver on 127.0.0.1 for the tracing section: answers 200 to
/// `POST /v1/traces` after reading the body, and counts requests and body bytes. It runs on a
/// thread and runtime of its own, so that it does not share the load generator's.
struct OtlpSink {
    addr: SocketAddr,
    requests: Arc<AtomicU64>,
    bytes: Arc<AtomicU64>,
}

impl OtlpSink {
    fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind the OTLP receiver");
        listener.set_nonblocking(true).expect("non-blocking");
        let addr = listener.local_addr().expect("local addr");
        let requests = Arc::new(AtomicU64::new(0));
        let bytes = Arc::new(AtomicU64::new(0));
        let (r, b) = (requests.clone(), bytes.clone());
        std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("receiver runtime");
            runtime.block_on(async move {
                let app = axum::Router::new()
                    .route(
                        "/v1/traces",
                        axum::routing::post(move |body: axum::body::Bytes| {
                            r.fetch_add(1, Ordering::Relaxed);
                            b.fetch_add(body.len() as u64, Ordering::Relaxed);
                            std::future::ready(axum::http::StatusCode::OK)
                        }),
                    )
                    // A batch of spans may be larger than axum's default limit of 2 MiB.
                    .layer(axum::extract::DefaultBodyLimit::disable());
                let listener =
                    tokio::net::TcpListener::from_std(listener).expect("receiver listener");
                let _ = axum::serve(listener, app).await;
            });
        });
        Self {
            addr,
            requests,
            bytes,
        }
    }
}

/// The access flow at concurrency 16 (or `--concurrency`) through two brokers of this build
/// side by side on one simulator: tracing off (no `OTEL_*` variable, so no layer is installed)
/// and on (`OTEL_EXPORTER_OTLP_ENDPOINT` at a local receiver, `OTEL_TRACES_SAMPLER=always_on`),
/// in interleaved rounds. Returns the verdict line.
async fn tracing_section(
    opts: &Opts,
    headers: &HeaderMap,
    setup: &Setup,
    report: &mut String,
) -> String {
    let concurrency = opts.concurrency.unwrap_or(16);
    let sink = OtlpSink::start();
    let sim = spawn_sim(3600);
    let on_env = [
        (
            "OTEL_EXPORTER_OTLP_ENDPOINT",
            format!("http://{}", sink.addr),
        ),
        ("OTEL_TRACES_SAMPLER", "always_on".to_owned()),
    ];
    let labels = ["tracing off", "tracing on, 100 % sampled"];
    let brokers = [
        spawn_broker(&sim, &setup.tested, setup),
        spawn_broker_with(&sim, &setup.tested, setup, &on_env),
    ];
    let targets: Vec<Arc<Target>> = brokers
        .iter()
        .map(|broker| {
            Arc::new(Target {
                http: http_client(),
                broker: broker.url(),
                sim: sim.url(),
                headers: headers.clone(),
                client_token: None,
            })
        })
        .collect();
    for (i, broker) in brokers.iter().enumerate() {
        let warmup = Duration::from_millis(500);
        run_load(
            &targets[i],
            (broker, &sim),
            Flow::Access,
            Via::Broker,
            concurrency,
            2000,
            warmup,
        )
        .await;
    }
    let exported_before = (
        sink.requests.load(Ordering::Relaxed),
        sink.bytes.load(Ordering::Relaxed),
    );
    let max_time = Duration::from_secs_f64(opts.seconds);
    let mut runs: [Vec<RunResult>; 2] = [Vec::new(), Vec::new()];
    for round in 0..opts.rounds.max(1) {
        // Alternate which broker goes first, so that a drift in the machine's load favours
        // neither.
        for k in 0..2 {
            let i = (k + round) % 2;
            let run = run_load(
                &targets[i],
                (&brokers[i], &sim),
                Flow::Access,
                Via::Broker,
                concurrency,
                opts.sessions,
                max_time,
            )
            .await;
            runs[i].push(run);
        }
    }
    // The exporter lingers 200 ms for a batch: wait for the last one before reading the sink.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let exports = sink.requests.load(Ordering::Relaxed) - exported_before.0;
    let export_bytes = sink.bytes.load(Ordering::Relaxed) - exported_before.1;
    let rates = |i: usize| runs[i].iter().map(RunResult::rate).collect::<Vec<_>>();
    let ratios: Vec<f64> = runs[1]
        .iter()
        .zip(&runs[0])
        .map(|(on, off)| on.rate() / off.rate())
        .collect();
    let cpu_ratios: Vec<f64> = runs[1]
        .iter()
        .zip(&runs[0])
        .map(|(on, off)| on.cpu_per_session()[1] / off.cpu_per_session()[1])
        .collect();
    let _ = writeln!(
        report,
        "\n### Tracing (issue 14)\n\nThe access flow at concurrency {concurrency} through two \
         brokers of this build ({}) side by side on one simulator: tracing off (no `OTEL_*` \
         variable: no layer installed) and on (`OTEL_EXPORTER_OTLP_ENDPOINT` at a receiver on \
         127.0.0.1 run by the bench, `OTEL_TRACES_SAMPLER=always_on`). 0.5 s warm-up each, then \
         {} round(s) of one {} s run per broker, back to back, alternating which goes first. \
         Figures are medians over rounds; the ratios are taken per round, then the median (range \
         in brackets). Latency in ms. The receiver got {exports} export request(s), {:.1} MiB, \
         during the rounds.\n\n\
         | broker | sess/s | p50 | p99 | broker CPU µs/session | sessions | errors |\n\
         |---|---:|---:|---:|---:|---:|---:|",
        setup.tested.ledger.name(),
        opts.rounds.max(1),
        opts.seconds,
        export_bytes as f64 / (1024.0 * 1024.0)
    );
    for (i, label) in labels.iter().enumerate() {
        let per_round = |f: &dyn Fn(&RunResult) -> f64| runs[i].iter().map(f).collect();
        let _ = writeln!(
            report,
            "| {label} | {:.0} | {:.2} | {:.2} | {:.0} | {} | {} |",
            median(rates(i)),
            median(per_round(&|r| r.latencies().p50)),
            median(per_round(&|r| r.latencies().p99)),
            median(per_round(&|r| r.cpu_per_session()[1])),
            runs[i].iter().map(|r| r.samples.len()).sum::<usize>(),
            runs[i].iter().map(|r| r.errors).sum::<usize>(),
        );
    }
    let range = |v: &[f64]| {
        let min = v.iter().copied().fold(f64::INFINITY, f64::min);
        let max = v.iter().copied().fold(0.0, f64::max);
        format!("{min:.2}–{max:.2}")
    };
    let (ratio, cpu_ratio) = (median(ratios.clone()), median(cpu_ratios.clone()));
    let _ = writeln!(
        report,
        "\nOn ÷ off: throughput **{ratio:.2}** ({}), broker CPU per session **{cpu_ratio:.2}** \
         ({}).",
        range(&ratios),
        range(&cpu_ratios)
    );
    format!(
        "tracing: on at 100 % sampling, c={concurrency}: {ratio:.2} × the throughput and \
         {cpu_ratio:.2} × the broker CPU per session of tracing off (no wall-clock target; the \
         instruction target is measured with scripts/callgrind-session.sh)"
    )
}

async fn herd_section(
    opts: &Opts,
    headers: &HeaderMap,
    setup: &Setup,
    report: &mut String,
) -> (Latencies, Latencies, u64) {
    let sim = spawn_sim(3600);
    let broker = spawn_broker(&sim, &setup.tested, setup);
    let admin = http_client();
    reset_sim_stats(&admin, &sim).await;
    // A new client: no connection to the broker exists yet either.
    let target = Arc::new(Target {
        http: http_client(),
        broker: broker.url(),
        sim: sim.url(),
        headers: headers.clone(),
        client_token: None,
    });
    let procs = (&broker, &sim);
    let long = Duration::from_secs(60);
    let burst = || {
        run_load(
            &target,
            procs,
            Flow::Access,
            Via::Broker,
            opts.herd,
            opts.herd,
            long,
        )
    };
    let cold = burst().await;
    let token_calls = sim_stat(&admin, &sim, CLIENT_CREDENTIALS, "200").await;
    // The same burst again, now that connections and the client token are in place.
    let warm = burst().await;
    let (c, w) = (cold.latencies(), warm.latencies());
    let _ = writeln!(
        report,
        "\n### Cold herd\n\nA fresh broker gets {} concurrent first access requests (new \
         connections to the broker and from it to finAPI), then the same burst again once warm.\n\n\
         | burst | ok | errors | client-token calls | p50 | p99 | max |\n|---|---:|---:|---:|---:|---:|---:|\n\
         | cold | {} | {} | **{token_calls}** | {:.1} | **{:.1}** | {:.1} |\n\
         | warm (same burst again) | {} | {} | – | {:.1} | {:.1} | {:.1} |",
        opts.herd, c.n, cold.errors, c.p50, c.p99, c.max, w.n, warm.errors, w.p50, w.p99, w.max
    );
    (c, w, token_calls)
}

async fn refresh_section(
    opts: &Opts,
    headers: &HeaderMap,
    setup: &Setup,
    report: &mut String,
) -> (Latencies, Latencies) {
    const TTL_SECS: u64 = 4;
    const CONCURRENCY: usize = 16;
    let sim = spawn_sim(TTL_SECS);
    let broker = spawn_broker(&sim, &setup.tested, setup);
    let target = Arc::new(Target {
        http: http_client(),
        broker: broker.url(),
        sim: sim.url(),
        headers: headers.clone(),
        client_token: None,
    });
    let procs = (&broker, &sim);
    run_load(
        &target,
        procs,
        Flow::Access,
        Via::Broker,
        CONCURRENCY,
        2000,
        Duration::from_millis(500),
    )
    .await;
    let admin = http_client();
    reset_sim_stats(&admin, &sim).await;
    // Watch the simulator for client-token calls while the load runs.
    let started = Instant::now();
    let duration = Duration::from_secs_f64(opts.refresh_seconds);
    let watcher = {
        let sim_url = sim.url();
        let admin = admin.clone();
        tokio::spawn(async move {
            let mut seen = 0;
            let mut events = Vec::new();
            while started.elapsed() < duration {
                let stats: serde_json::Value = admin
                    .get(format!("{sim_url}/__sim/stats"))
                    .send()
                    .await
                    .expect("sim stats")
                    .json()
                    .await
                    .expect("sim stats body");
                let count = stats[CLIENT_CREDENTIALS]["200"].as_u64().unwrap_or(0);
                if count > seen {
                    events.push(started.elapsed());
                    seen = count;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            events
        })
    };
    let run = run_load(
        &target,
        procs,
        Flow::Access,
        Via::Broker,
        CONCURRENCY,
        usize::MAX,
        duration,
    )
    .await;
    let events = watcher.await.expect("watcher");
    let rejected = sim_stat(&admin, &sim, "POST /api/v2/users", "401").await;
    let token_calls = sim_stat(&admin, &sim, CLIENT_CREDENTIALS, "200").await;
    // A request is in a refresh window when it overlaps [event − 50 ms, event + 50 ms]; the
    // watcher sees a call up to ~15 ms after it happened.
    let window = |s: &Sample| {
        let (from, to) = (s.start_us, s.start_us + s.latency_us);
        events.iter().any(|e| {
            let e = e.as_micros() as u64;
            to + 50_000 >= e && from <= e + 50_000
        })
    };
    let in_window = Latencies::of(
        run.samples
            .iter()
            .filter(|s| window(s))
            .map(|s| s.latency_us),
    );
    let steady = Latencies::of(
        run.samples
            .iter()
            .filter(|s| !window(s))
            .map(|s| s.latency_us),
    );
    let _ = writeln!(
        report,
        "\n### Client token expiring under load\n\nSimulator client tokens live {TTL_SECS} s; \
         access flow at concurrency {CONCURRENCY} for {} s ({} sessions, {} errors): {token_calls} \
         client-token calls, {rejected} `POST /api/v2/users` answered 401 (an expired token \
         met, then retried).\n\n\
         | requests | n | p50 | p99 | max |\n|---|---:|---:|---:|---:|\n\
         | within ±50 ms of a client-token call | {} | {:.2} | **{:.2}** | {:.1} |\n\
         | all others (steady state) | {} | {:.2} | **{:.2}** | {:.1} |",
        opts.refresh_seconds,
        run.samples.len(),
        run.errors,
        in_window.n,
        in_window.p50,
        in_window.p99,
        in_window.max,
        steady.n,
        steady.p50,
        steady.p99,
        steady.max
    );
    (in_window, steady)
}

async fn memory_section(
    opts: &Opts,
    headers: &HeaderMap,
    setup: &Setup,
    report: &mut String,
) -> (u64, u64, u64) {
    let sim = spawn_sim(3600);
    // The defaults, as shipped (issue 15: "at default settings").
    let (broker, _) = spawn_default_broker(&sim.url(), None, false, setup);
    let target = Arc::new(Target {
        http: http_client(),
        broker: broker.url(),
        sim: sim.url(),
        headers: headers.clone(),
        client_token: None,
    });
    let procs = (&broker, &sim);
    let idle = broker.rss_kib();
    let long = Duration::from_secs(600);
    let n = opts.mem_sessions;
    let first = run_load(&target, procs, Flow::Mixed, Via::Broker, 64, n, long).await;
    let after_1 = broker.rss_kib();
    let second = run_load(&target, procs, Flow::Mixed, Via::Broker, 64, n, long).await;
    let after_2 = broker.rss_kib();
    let hwm = broker.status_field_kib("VmHWM:");
    let mib = |kib: u64| kib as f64 / 1024.0;
    let _ = writeln!(
        report,
        "\n### Resident memory of the broker\n\nA broker at its defaults (but the caller's \
         rate limit; log level `info`, SQLite ledger per `BENCH_LEDGER`); access and standalone \
         sessions in turn at concurrency 64 ({} + {} ok, {} errors); `VmRSS` from \
         `/proc/PID/status`.\n\n\
         | after | RSS MiB |\n|---|---:|\n| start (idle) | {:.1} |\n| {n} sessions | **{:.1}** |\n\
         | {} sessions | **{:.1}** |\n| peak (`VmHWM`) | {:.1} |",
        first.samples.len(),
        second.samples.len(),
        first.errors + second.errors,
        mib(idle),
        mib(after_1),
        2 * n,
        mib(after_2),
        mib(hwm)
    );
    (idle, after_1, after_2)
}

// ---------------------------------------------------------------------------------------------
// finAPI far away, and memory at the defaults

/// [`broker_env`] without the settings the benchmark raises or quiets for the other sections:
/// the broker at its defaults (`limits.max_in_flight`, log level, ledger pool, drain), except
/// the caller's rate limit, a per-caller policy that one bench caller would hit at once.
/// `ca_file`: finAPI over HTTPS trusting it, instead of plain HTTP.
fn default_broker_env(
    listen: SocketAddr,
    sim_url: &str,
    ca_file: Option<&Path>,
    ledger_url: Option<&str>,
) -> Vec<(&'static str, String)> {
    const NOT_DEFAULT: [&str; 6] = [
        "GIROIDENT_BROKER_LIMITS__MAX_IN_FLIGHT",
        "GIROIDENT_BROKER_SERVER__DRAIN_SECS",
        "GIROIDENT_BROKER_LOG__FILTER",
        "RUST_LOG",
        "GIROIDENT_BROKER_IDENTITIES__DATABASE_MAX_CONNECTIONS",
        "GIROIDENT_BROKER_FINAPI__ALLOW_INSECURE_HTTP",
    ];
    let mut env: Vec<_> = broker_env(listen, sim_url, ledger_url)
        .into_iter()
        .filter(|(key, _)| !NOT_DEFAULT.contains(key))
        .collect();
    match ca_file {
        Some(file) => env.push((
            "GIROIDENT_BROKER_FINAPI__CA_FILE",
            file.display().to_string(),
        )),
        None => env.push((
            "GIROIDENT_BROKER_FINAPI__ALLOW_INSECURE_HTTP",
            "true".into(),
        )),
    }
    env
}

/// A broker at its defaults ([`default_broker_env`]) in front of `sim_url`.
/// `http2`: `finapi.http2 = true` (off by default).
fn spawn_default_broker(
    sim_url: &str,
    ca_file: Option<&Path>,
    http2: bool,
    setup: &Setup,
) -> (Proc, SocketAddr) {
    let addr = free_addr();
    let admin = free_addr();
    let (url, files) = setup.ledger_db(setup.tested.ledger);
    let mut command = Command::new(&setup.tested.bin);
    command
        .env_clear()
        .envs(default_broker_env(addr, sim_url, ca_file, url.as_deref()))
        .env("GIROIDENT_BROKER_ADMIN__LISTEN", admin.to_string())
        .env("GIROIDENT_BROKER_FINAPI__HTTP2", http2.to_string())
        .arg("serve")
        // The default `info` lines, written as they would be, read by nobody.
        .stderr(Stdio::null());
    let mut proc = spawn_until(&mut command, addr, "/readyz", || {
        answers_200(addr, "/readyz")
    });
    proc._ledger_files = files;
    (proc, admin)
}

/// The broker's finAPI call outcomes and retries from its `/metrics`, for the log.
async fn finapi_outcomes(admin: SocketAddr) -> String {
    let text = match reqwest::get(format!("http://{admin}/metrics")).await {
        Ok(response) => response.text().await.unwrap_or_default(),
        Err(e) => return e.to_string(),
    };
    text.lines()
        .filter(|l| {
            !l.starts_with('#')
                && (l.starts_with("broker_finapi_calls_total") || l.contains("retr"))
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// A simulator serving HTTPS from its own authority (`sim --tls-self-signed-ca`), offering
/// `alpn` (`h2` or `http1`), with `latency_ms` added to every finAPI call.
struct FarSim {
    proc: Proc,
    url: String,
    ca_file: PathBuf,
    /// Trusts the simulator's authority, for `/__sim/stats`.
    admin: reqwest::Client,
    _dir: TempDir,
}

impl FarSim {
    fn start(latency_ms: u64, alpn: &str) -> Self {
        let dir = TempDir::new("far-sim");
        let ca_file = dir.path().join("ca.pem");
        let addr = free_addr();
        let fault = format!(r#"{{"endpoint":"*","latencyMs":{latency_ms}}}"#);
        let mut command = sim_command(addr);
        command
            .args(["--fault", &fault, "--tls-alpn", alpn])
            .arg("--tls-self-signed-ca")
            .arg(&ca_file);
        command.stderr(Stdio::inherit());
        // It writes the authority's certificate before it binds: a connection means ready.
        let proc = spawn_until(&mut command, addr, "the HTTPS simulator", || {
            TcpStream::connect(addr).is_ok()
        });
        let pem = std::fs::read(&ca_file).expect("the simulator's CA file");
        let admin = reqwest::Client::builder()
            .tls_certs_merge([reqwest::Certificate::from_pem(&pem).expect("CA PEM")])
            .build()
            .expect("reqwest client");
        Self {
            url: format!("https://{addr}"),
            proc,
            ca_file,
            admin,
            _dir: dir,
        }
    }

    /// `connections` of `GET /__sim/stats`: accepted, TLS handshakes, of them HTTP/2. The
    /// call's own connection is among them.
    async fn connections(&self) -> [u64; 3] {
        let stats: serde_json::Value = self
            .admin
            .get(format!("{}/__sim/stats", self.url))
            .send()
            .await
            .expect("sim stats")
            .json()
            .await
            .expect("sim stats body");
        let c = &stats["connections"];
        ["accepted", "tlsHandshakes", "h2"].map(|key| c[key].as_u64().unwrap_or(0))
    }

    async fn reset(&self) {
        self.admin
            .delete(format!("{}/__sim/stats", self.url))
            .send()
            .await
            .expect("reset sim stats");
    }
}

fn rss_kib_of(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// The soft limit on open files of this process (the load generator holds one socket per
/// session in flight).
fn open_files_limit() -> String {
    std::fs::read_to_string("/proc/self/limits")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("Max open files"))
        .and_then(|rest| rest.split_whitespace().next().map(str::to_owned))
        .unwrap_or_else(|| "unknown".into())
}

struct FarRow {
    latency_ms: u64,
    alpn: &'static str,
    concurrency: usize,
    run: RunResult,
    /// Connections and handshakes the warm-up opened (from cold), then per 1,000 measured
    /// sessions: accepted, TLS handshakes, HTTP/2 handshakes.
    warm_connections: [u64; 3],
    measured_connections: [u64; 3],
    idle_rss_kib: u64,
    /// Highest broker RSS sampled (every 50 ms) during the measured run.
    loaded_rss_kib: u64,
}

async fn far_section(
    opts: &Opts,
    headers: &HeaderMap,
    setup: &Setup,
    report: &mut String,
) -> Vec<FarRow> {
    let mut rows = Vec::new();
    let run_time = Duration::from_secs_f64(opts.far_seconds);
    let warm_time = Duration::from_secs(30);
    for latency_ms in [50u64, 200] {
        if opts.latency.is_some_and(|only| only != latency_ms) {
            continue;
        }
        // Two calls per access session: in flight = rate × 2 × latency, plus the broker's
        // own time. Enough for a few thousand sessions per second, what two cores allow, and
        // within the default `limits.max_in_flight` (2048).
        let concurrency = opts
            .concurrency
            .unwrap_or(if latency_ms == 50 { 1000 } else { 2000 });
        for alpn in ["h2", "http1"] {
            if opts.alpn.as_deref().is_some_and(|only| only != alpn) {
                continue;
            }
            eprintln!("  far: {latency_ms} ms, ALPN {alpn}, c={concurrency}");
            let sim = FarSim::start(latency_ms, alpn);
            // The h2 rows turn on `finapi.http2`; the simulator offers HTTP/2 only to them.
            let (broker, admin) =
                spawn_default_broker(&sim.url, Some(&sim.ca_file), alpn == "h2", setup);
            let idle_rss_kib = broker.rss_kib();
            let target = Arc::new(Target {
                http: http_client(),
                broker: broker.url(),
                sim: sim.url.clone(),
                headers: headers.clone(),
                client_token: None,
            });
            let procs = (&broker, &sim.proc);
            // From cold until each worker has had three sessions (or the time is up): the
            // connection pools have grown to the load by then.
            let warm = run_load(
                &target,
                procs,
                Flow::Access,
                Via::Broker,
                concurrency,
                3 * concurrency,
                warm_time,
            )
            .await;
            let warm_connections = sim.connections().await;
            eprintln!("    warm-up: {:.0}/s, {} errors", warm.rate(), warm.errors);
            sim.reset().await;
            let pid = broker.child.id();
            let peak = Arc::new(AtomicU64::new(0));
            let sampler = {
                let peak = peak.clone();
                tokio::spawn(async move {
                    loop {
                        peak.fetch_max(rss_kib_of(pid), Ordering::Relaxed);
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                })
            };
            let run = run_load(
                &target,
                procs,
                Flow::Access,
                Via::Broker,
                concurrency,
                usize::MAX,
                run_time,
            )
            .await;
            sampler.abort();
            let measured_connections = sim.connections().await;
            eprintln!(
                "    {}",
                finapi_outcomes(admin).await.replace('\n', "\n    ")
            );
            rows.push(FarRow {
                latency_ms,
                alpn,
                concurrency,
                run,
                warm_connections,
                measured_connections,
                idle_rss_kib,
                loaded_rss_kib: peak.load(Ordering::Relaxed),
            });
        }
    }
    let mib = |kib: u64| kib as f64 / 1024.0;
    let _ = writeln!(
        report,
        "\n### finAPI far away (HTTPS, latency fault on every finAPI call)\n\n\
         Access sessions through a broker at its defaults (but the caller's rate limit) in \
         front of `sim --tls-self-signed-ca` with `--fault '{{\"endpoint\":\"*\",\"latencyMs\":\
         MS}}'` and `--tls-alpn h2|http1` (the h2 rows with `finapi.http2 = true`, the http1 rows at the \
         default); a warm-up from cold of three sessions per worker (at most {:.0} s), then \
         {:.1} s measured. \
         CPU from `/proc/PID/stat` (utime+stime); connections and TLS handshakes from the \
         simulator's `GET /__sim/stats` (\"warm-up\": opened from cold; \"/1k\": per 1,000 \
         measured sessions); RSS sampled every 50 ms, \"per 1k in flight\" = (peak − idle) / \
         concurrency × 1,000. Load generator's open-files limit: {}.\n\n\
         | latency | ALPN offered | c | sessions/s | errors | p50 ms | p99 ms | broker CPU µs/session | broker cores busy | generator + sim CPU µs/session | conns warm-up (h2) | conns /1k | handshakes /1k | RSS idle MiB | RSS peak MiB | MiB per 1k in flight |\n\
         |---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        warm_time.as_secs_f64(),
        run_time.as_secs_f64(),
        open_files_limit()
    );
    for row in &rows {
        let r = &row.run;
        let l = r.latencies();
        let cpu = r.cpu_per_session();
        let per_1k = |n: u64| n as f64 * 1000.0 / r.samples.len().max(1) as f64;
        let in_flight_k = row.concurrency as f64 / 1000.0;
        let _ = writeln!(
            report,
            "| {} ms | {} | {} | **{:.0}** | {} | {:.1} | {:.1} | **{:.0}** | {:.2} | {:.0} | {} ({}) | {:.2} | {:.2} | {:.1} | {:.1} | {:.1} |",
            row.latency_ms,
            row.alpn,
            row.concurrency,
            r.rate(),
            r.errors,
            l.p50,
            l.p99,
            cpu[1],
            r.cpu[1] / r.elapsed.as_secs_f64(),
            cpu[0] + cpu[2],
            row.warm_connections[0],
            row.warm_connections[2],
            per_1k(row.measured_connections[0]),
            per_1k(row.measured_connections[1]),
            mib(row.idle_rss_kib),
            mib(row.loaded_rss_kib),
            (mib(row.loaded_rss_kib) - mib(row.idle_rss_kib)) / in_flight_k,
        );
        if let Some(e) = &r.first_error {
            let _ = writeln!(report, "|  | first error: {e} |||||||||||||||");
        }
    }
    rows
}

fn verdict(met: bool) -> &'static str {
    if met { "met" } else { "not met" }
}

fn main() {
    let opts = Opts::parse();
    let _ = rustls::crypto::ring::default_provider().install_default();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let headers = broker_headers(&opts.api_key);
    let setup = Setup::from_env();
    let mut report = String::new();
    let started = Instant::now();
    let _ = writeln!(
        report,
        "## Results\n\nMachine: {}; load average at start {}; {}. Broker under test (all \
         sections but the ledger's): {} with {}.",
        machine(),
        loadavg(),
        if opts.quick {
            "quick run (`--quick`)"
        } else {
            "full run"
        },
        if setup.baseline.is_some() {
            "`BENCH_BROKER_BIN`"
        } else {
            "this build"
        },
        setup.tested.ledger.name()
    );
    let mut verdicts = Vec::new();
    if opts.runs("ready") {
        eprintln!("ready time…");
        ready_section(&setup, &mut report, if opts.quick { 5 } else { 20 });
    }
    runtime.block_on(async {
        let mut steady_p99_64 = None;
        if opts.runs("sweep") {
            eprintln!("throughput sweep…");
            let rows = sweep_section(&opts, &headers, &setup, &mut report).await;
            for row in &rows {
                let ratio = row.median().ratio();
                if row.concurrency == 64 {
                    verdicts.push(format!(
                        "{} c=64 throughput {ratio:.2} × direct (target ≥ 0.60): {}",
                        row.flow.name(),
                        verdict(ratio >= 0.6)
                    ));
                    if row.flow == Flow::Access {
                        steady_p99_64 = Some(row.median().broker.latencies().p99);
                    }
                }
                if row.concurrency == 1 {
                    let (p50, p99) = row.median_added();
                    verdicts.push(format!(
                        "{} c=1 adds {p50:+.3} ms at p50 (≤ 0.25), {p99:+.3} ms at p99 (≤ 1): {}",
                        row.flow.name(),
                        verdict(p50 <= 0.25 && p99 <= 1.0)
                    ));
                }
            }
        }
        if opts.runs("ledger") {
            eprintln!("identity ledger…");
            verdicts.extend(ledger_section(&opts, &headers, &setup, &mut report).await);
        }
        if opts.runs("tracing") {
            eprintln!("tracing off and on…");
            verdicts.push(tracing_section(&opts, &headers, &setup, &mut report).await);
        }
        if opts.runs("herd") {
            eprintln!("cold herd…");
            let (cold, warm, calls) = herd_section(&opts, &headers, &setup, &mut report).await;
            let vs_64 = steady_p99_64.map_or(String::new(), |p| {
                format!("; {:.1} × the c=64 steady p99 of {p:.2} ms", cold.p99 / p)
            });
            verdicts.push(format!(
                "cold herd: {calls} client-token call(s) (target 1): {}; herd p99 {:.1} ms = {:.2} × the warm burst's p99 (target ≤ 3): {}{vs_64}",
                verdict(calls == 1),
                cold.p99,
                cold.p99 / warm.p99,
                verdict(cold.p99 <= 3.0 * warm.p99)
            ));
        }
        if opts.runs("refresh") {
            eprintln!("token refresh under load…");
            let (window, steady) = refresh_section(&opts, &headers, &setup, &mut report).await;
            let ratio = window.p99 / steady.p99;
            verdicts.push(format!(
                "refresh window p99 {:.2} ms = {ratio:.2} × steady p99 {:.2} ms (target ≤ 1.2): {}",
                window.p99,
                steady.p99,
                verdict(ratio <= 1.2)
            ));
        }
        if opts.runs("far") {
            eprintln!("finAPI far away…");
            for row in far_section(&opts, &headers, &setup, &mut report).await {
                let busy = row.run.cpu[1] / row.run.elapsed.as_secs_f64();
                verdicts.push(format!(
                    "far {} ms ALPN {} c={}: {:.0} sessions/s, broker {busy:.2} cores busy, {} errors (nothing but CPU may limit: no shed requests): {}",
                    row.latency_ms,
                    row.alpn,
                    row.concurrency,
                    row.run.rate(),
                    row.run.errors,
                    verdict(row.run.errors == 0)
                ));
            }
        }
        if opts.runs("memory") {
            eprintln!("memory…");
            let (_, first, second) = memory_section(&opts, &headers, &setup, &mut report).await;
            let (a, b) = (first as f64 / 1024.0, second as f64 / 1024.0);
            verdicts.push(format!(
                "RSS {a:.1} MiB after {} sessions (≤ 30), {b:.1} MiB after {} (no growth: {:+.1} MiB): {}",
                opts.mem_sessions,
                2 * opts.mem_sessions,
                b - a,
                // Allocator noise of a few hundred KiB is not growth.
                verdict(a <= 30.0 && b - a <= 1.0)
            ));
        }
    });
    let _ = writeln!(report, "\n### Verdicts\n");
    for v in &verdicts {
        let _ = writeln!(report, "- {v}");
    }
    let _ = writeln!(
        report,
        "\nLoad average at end {}; whole run {:.0} s.",
        loadavg(),
        started.elapsed().as_secs_f64()
    );
    print!("{report}");
    if let Some(path) = &opts.out {
        std::fs::write(path, &report).expect("write --out");
        eprintln!("report written to {path}");
    }
}
