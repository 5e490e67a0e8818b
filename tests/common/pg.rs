//! Throwaway PostgreSQL servers for the ledger tests, started from the server binaries on the
//! machine (`initdb`, `pg_ctl`) on 127.0.0.1 and a free port, with trust authentication, a
//! data directory in a fresh temp dir, and fsync off. As root the binaries run as the `postgres`
//! user (PostgreSQL refuses to run as root). No manual set-up: when the binaries are missing the
//! tests fail and name the Debian package.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};

const MISSING: &str = "PostgreSQL server binaries not found: install the Debian package \
                       `postgresql` (apt-get install postgresql)";

/// A directory under the system temp dir, removed (with its contents) on drop.
pub struct TempDir(PathBuf);

impl TempDir {
    /// A new, empty directory named after `prefix`, the process and a counter.
    pub fn new(prefix: &str) -> Self {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let path = std::env::temp_dir().join(format!(
            "{prefix}-{}-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed),
            uuid::Uuid::new_v4().simple()
        ));
        std::fs::create_dir_all(&path).expect("temp dir is created");
        Self(path)
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A running PostgreSQL server of its own; stopped and its files removed on [`PgServer::stop`]
/// or drop.
pub struct PgServer {
    bin: PathBuf,
    dir: TempDir,
    port: u16,
    as_postgres: bool,
    running: bool,
}

/// Starts a fresh server (initdb, then `pg_ctl -w start`). Panics when the binaries are
/// missing (naming the Debian package) or the server does not start (with its log).
pub async fn start() -> PgServer {
    tokio::task::spawn_blocking(|| PgServer::start_blocking(false))
        .await
        .expect("the PostgreSQL start-up task does not panic")
}

/// A URL to a new, empty database on a server shared by the tests of this test binary. The
/// server stops when the last [`SharedDb`] is dropped (and a later call starts another).
pub async fn database() -> SharedDb {
    static SHARED: Mutex<Weak<PgServer>> = Mutex::new(Weak::new());
    static NEXT_DB: AtomicU64 = AtomicU64::new(0);
    let server = tokio::task::spawn_blocking(|| {
        // Held across the start so that concurrent tests share one server.
        let mut shared = SHARED
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        match shared.upgrade() {
            Some(server) => server,
            None => {
                let server = Arc::new(PgServer::start_blocking(false));
                *shared = Arc::downgrade(&server);
                server
            }
        }
    })
    .await
    .expect("the PostgreSQL start-up task does not panic");
    let name = format!("ledger_{}", NEXT_DB.fetch_add(1, Ordering::Relaxed));
    server.psql(&format!("CREATE DATABASE {name}"));
    SharedDb {
        url: server.url_for(&name),
        _server: server,
    }
}

/// A database of its own on the shared server; keeps the server running while alive.
pub struct SharedDb {
    url: String,
    _server: Arc<PgServer>,
}

impl SharedDb {
    /// `postgres://postgres@127.0.0.1:PORT/NAME`.
    pub fn url(&self) -> String {
        self.url.clone()
    }
}

impl PgServer {
    /// `postgres://postgres@127.0.0.1:PORT/postgres`.
    pub fn url(&self) -> String {
        self.url_for("postgres")
    }

    fn url_for(&self, database: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{database}", self.port)
    }

    /// A new, empty database `name` on this server; its URL.
    pub fn create_database(&self, name: &str) -> String {
        self.psql(&format!("CREATE DATABASE {name}"));
        self.url_for(name)
    }

    /// The server's major version, from its binaries' directory (`/usr/lib/postgresql/NN/bin`).
    pub fn version(&self) -> String {
        self.bin
            .parent()
            .and_then(Path::file_name)
            .map_or_else(String::new, |v| v.to_string_lossy().into_owned())
    }

    /// Stops the server at once (`pg_ctl stop -m immediate`); its files go on drop.
    pub fn stop(&mut self) {
        if self.running {
            self.running = false;
            let _ = self.pg_ctl(&["stop", "-m", "immediate", "-w"]);
        }
    }

    /// Starts a fresh server, blocking. `durable` keeps PostgreSQL's defaults (`fsync`,
    /// `synchronous_commit`, `full_page_writes` on: the benchmark's figures are those of a
    /// ledger that survives a crash); the tests turn them off for speed.
    pub fn start_blocking(durable: bool) -> PgServer {
        let bin = server_binaries();
        let as_postgres = running_as_root();
        static REAP: std::sync::Once = std::sync::Once::new();
        REAP.call_once(|| reap_stale(&bin, as_postgres));
        let dir = TempDir::new("giroident-pg");
        let data = dir.path().join("data");
        let mut server = PgServer {
            bin,
            dir,
            port: 0,
            as_postgres,
            running: false,
        };
        if as_postgres {
            let owner = Command::new("chown")
                .args(["-R", "postgres:postgres"])
                .arg(server.dir.path())
                .output()
                .expect("chown runs");
            assert!(
                owner.status.success(),
                "cannot hand the temp dir to the `postgres` user (does it exist? the Debian \
                 package `postgresql` creates it): {}",
                String::from_utf8_lossy(&owner.stderr)
            );
        }
        let init = server.run(
            "initdb",
            &[
                "-D".as_ref(),
                data.as_os_str(),
                "-U".as_ref(),
                "postgres".as_ref(),
                "-A".as_ref(),
                "trust".as_ref(),
                "-E".as_ref(),
                "UTF8".as_ref(),
                "--locale=C".as_ref(),
                "--no-sync".as_ref(),
            ],
        );
        assert!(
            init.status.success(),
            "initdb failed: {}{}",
            String::from_utf8_lossy(&init.stdout),
            String::from_utf8_lossy(&init.stderr)
        );
        // A free port can be taken by someone else before the server binds it: try a few.
        let mut last_log = String::new();
        for _ in 0..5 {
            server.port = free_port();
            let fast = if durable {
                ""
            } else {
                " -c fsync=off -c synchronous_commit=off -c full_page_writes=off"
            };
            let options = format!(
                "-c listen_addresses=127.0.0.1 -p {} -k {}{fast} -c max_connections=300",
                server.port,
                server.dir.path().display()
            );
            let log = server.dir.path().join("server.log");
            let started = server.pg_ctl(&[
                "start",
                "-w",
                "-t",
                "60",
                "-l",
                &log.to_string_lossy(),
                "-o",
                &options,
            ]);
            if started.status.success() {
                server.running = true;
                return server;
            }
            last_log = std::fs::read_to_string(&log).unwrap_or_default();
        }
        panic!("PostgreSQL did not start: {last_log}");
    }

    fn pg_ctl(&self, args: &[&str]) -> Output {
        let data = self.dir.path().join("data");
        let mut all: Vec<&std::ffi::OsStr> = vec!["-D".as_ref(), data.as_os_str()];
        all.extend(args.iter().map(std::ffi::OsStr::new));
        self.run("pg_ctl", &all)
    }

    /// Runs one SQL statement as the superuser over the server's socket; panics on failure.
    fn psql(&self, sql: &str) {
        let port = self.port.to_string();
        let socket = self.dir.path().as_os_str().to_owned();
        let out = self.run(
            "psql",
            &[
                "-h".as_ref(),
                socket.as_os_str(),
                "-p".as_ref(),
                port.as_ref(),
                "-U".as_ref(),
                "postgres".as_ref(),
                "-d".as_ref(),
                "postgres".as_ref(),
                "-v".as_ref(),
                "ON_ERROR_STOP=1".as_ref(),
                "-qc".as_ref(),
                sql.as_ref(),
            ],
        );
        assert!(
            out.status.success(),
            "psql {sql:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Runs a PostgreSQL program from the server's bin directory (psql from there or PATH), as
    /// the `postgres` user when the tests run as root.
    fn run(&self, program: &str, args: &[&std::ffi::OsStr]) -> Output {
        let mut path = self.bin.join(program);
        if !path.exists() {
            path = PathBuf::from(program);
        }
        let mut command = if self.as_postgres {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(&path);
            c
        } else {
            Command::new(&path)
        };
        command
            .args(args)
            // The caller's directory may be closed to the `postgres` user.
            .current_dir(self.dir.path())
            .env_remove("PGDATA")
            .env_remove("PGHOST")
            .env_remove("PGPORT")
            .env_remove("PGUSER")
            .env_remove("PGDATABASE")
            .output()
            .unwrap_or_else(|e| panic!("cannot run {}: {e}", path.display()))
    }
}

impl Drop for PgServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Stops the servers and removes the temp dirs of test processes that were killed before their
/// drops ran (names carry the pid; a live pid is left alone).
fn reap_stale(bin: &Path, as_postgres: bool) {
    let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(rest) = name
            .strip_prefix("giroident-pg-")
            .or_else(|| name.strip_prefix("giroident-ledger-"))
        else {
            continue;
        };
        let Some(pid) = rest.split('-').next().and_then(|p| p.parse::<u32>().ok()) else {
            continue;
        };
        if Path::new(&format!("/proc/{pid}")).exists() {
            continue;
        }
        let dir = TempDir(entry.path());
        if dir.path().join("data/postmaster.pid").exists() {
            let server = PgServer {
                bin: bin.to_owned(),
                dir,
                port: 0,
                as_postgres,
                running: true,
            };
            drop(server);
        }
    }
}

/// The directory holding `initdb` and `pg_ctl`: the newest `/usr/lib/postgresql/*/bin`
/// (Debian's layout, off PATH), else PATH. Panics naming the Debian package when there is none.
fn server_binaries() -> PathBuf {
    find_server_binaries(Path::new("/usr/lib/postgresql"), std::env::var_os("PATH"))
        .unwrap_or_else(|missing| panic!("{missing}"))
}

/// [`server_binaries`] with the Debian root and PATH given; the error is the message that
/// names the package to install.
pub fn find_server_binaries(
    debian_root: &Path,
    path: Option<std::ffi::OsString>,
) -> Result<PathBuf, &'static str> {
    let has_server = |dir: &Path| dir.join("initdb").is_file() && dir.join("pg_ctl").is_file();
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir(debian_root)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| {
            let version = entry.file_name().to_str()?.parse::<u32>().ok()?;
            let bin = entry.path().join("bin");
            has_server(&bin).then_some((version, bin))
        })
        .collect();
    versions.sort();
    if let Some((_, bin)) = versions.pop() {
        return Ok(bin);
    }
    path.into_iter()
        .flat_map(|path| std::env::split_paths(&path).collect::<Vec<_>>())
        .find(|dir| has_server(dir))
        .ok_or(MISSING)
}

/// Whether the effective uid (from `/proc/self/status`) is 0.
fn running_as_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            let uids = status.lines().find(|l| l.starts_with("Uid:"))?.to_owned();
            uids.split_whitespace().nth(2).map(|euid| euid == "0")
        })
        .unwrap_or(false)
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port on 127.0.0.1")
}
