//! `giroident-broker demo`: the simulator and the broker in one process on loopback, with demo
//! credentials and nothing to set up.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use secrecy::{ExposeSecret, SecretString};

use crate::config::{ConfigError, LogFormat, Settings, TracingSettings, sha256, to_hex};
use crate::sim::{self, DEMO_CLIENT_ID, DEMO_CLIENT_SECRET, SimConfig};
use crate::startup::{Application, StartupError};

/// Where the demo's broker listens unless `--listen`, a `--config` file or the environment says
/// otherwise.
pub const DEFAULT_LISTEN: SocketAddr =
    SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), 8080);

/// Why the demo could not start.
#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    /// The simulator could not listen.
    #[error("cannot start the simulator on {addr}")]
    Simulator {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    /// The configuration (the demo's, with the `--config` file and the environment over it)
    /// was refused.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The broker could not start.
    #[error(transparent)]
    Startup(#[from] StartupError),
    /// The OS random source failed, so no password key could be made.
    #[error("the OS random source failed")]
    NoRandomness,
    /// The simulator's certificate authority could not be made.
    #[error("cannot make the simulator's certificates")]
    Tls(#[source] sim::SimTlsError),
    /// The authority's certificate could not be written.
    #[error("cannot write {path}")]
    CaFile {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// What the `demo` command line asks for.
#[derive(Debug)]
pub struct DemoOptions {
    /// `--listen`: the broker's address, over any configured `server.listen`.
    pub listen: Option<SocketAddr>,
    /// `--sim-listen`: the simulator's address (port 0: any free port).
    pub sim_listen: SocketAddr,
    /// The demo caller's API key.
    pub api_key: SecretString,
    /// `--config`: a file layered over the demo's settings.
    pub config: Option<PathBuf>,
}

/// Where a demo or test broker keeps its identities.
pub struct Ledger {
    /// `identities.database_url`.
    pub database_url: SecretString,
    /// `identities.password_key`.
    pub password_key: SecretString,
}

impl Ledger {
    /// A fresh SQLite file in the system's temporary directory and a random password key;
    /// returns the file's path too.
    pub fn fresh() -> Result<(Self, PathBuf), getrandom::Error> {
        let path = std::env::temp_dir().join(format!(
            "giroident-broker-demo-{}.db",
            uuid::Uuid::new_v4().simple()
        ));
        let ledger = Self {
            database_url: SecretString::from(format!("sqlite://{}", path.display())),
            password_key: crate::random::alphanumeric(48)?,
        };
        Ok((ledger, path))
    }
}

/// The demo's own settings, as a layer over the built-in defaults (see
/// [`Settings::load_layered`]): the simulator's URLs and client, the authority its
/// certificate comes from (`ca_file`, when given), one caller `demo` holding `api_key` and
/// allowed both flows, the identity ledger, the listeners, and no drain period.
pub fn preset(
    listen: SocketAddr,
    admin_listen: SocketAddr,
    sim_url: &str,
    ca_file: Option<&Path>,
    api_key: &SecretString,
    ledger: &Ledger,
) -> Vec<(String, String)> {
    let digest = to_hex(&sha256(api_key.expose_secret().as_bytes()));
    let ca_file = ca_file.map(|path| ("finapi.ca_file", path.display().to_string()));
    [
        (
            "auth.callers",
            format!(
                r#"[{{name = "demo", key_sha256 = "{digest}", flows = ["standalone", "access"]}}]"#
            ),
        ),
        ("server.listen", listen.to_string()),
        ("server.drain_secs", "0".to_owned()),
        ("admin.listen", admin_listen.to_string()),
        ("finapi.access_url", sim_url.to_owned()),
        ("finapi.process_controller_url", sim_url.to_owned()),
        ("finapi.client_id", DEMO_CLIENT_ID.to_owned()),
        ("finapi.client_secret", DEMO_CLIENT_SECRET.to_owned()),
        // Readable on a terminal; `log.format` in the file or the environment wins.
        ("log.format", "pretty".to_owned()),
        (
            "identities.database_url",
            ledger.database_url.expose_secret().to_owned(),
        ),
        (
            "identities.password_key",
            ledger.password_key.expose_secret().to_owned(),
        ),
    ]
    .into_iter()
    .chain(ca_file)
    .map(|(key, value)| (key.to_owned(), value))
    .collect()
}

/// Broker settings pointing at a simulator: the [`preset`] over the defaults, nothing else.
/// For tests against a plain-HTTP simulator (an `http://` `sim_url`), the preset also sets
/// `finapi.allow_insecure_http`; the demo itself serves HTTPS and never does.
pub fn settings_for_simulator(
    listen: SocketAddr,
    admin_listen: SocketAddr,
    sim_url: &str,
    ca_file: Option<&Path>,
    api_key: &SecretString,
    ledger: &Ledger,
) -> Result<Settings, ConfigError> {
    let mut preset = preset(listen, admin_listen, sim_url, ca_file, api_key, ledger);
    if sim_url.starts_with("http://") {
        preset.push(("finapi.allow_insecure_http".to_owned(), "true".to_owned()));
    }
    Settings::load_layered(preset, None, std::iter::empty())
}

/// The demo's logging and tracing settings: its [`preset`] with the `--config` file and `env`
/// over it, as [`run`] will load them, read before anything starts so that the logs follow
/// them from the first line. Errors: the configuration's problems, every one with its key.
pub fn telemetry_settings(
    config: Option<&Path>,
    env: impl IntoIterator<Item = (String, String)>,
) -> Result<(LogFormat, String, TracingSettings), ConfigError> {
    // Stand-ins for what only exists once the demo runs; they are validated, never used.
    let ledger = Ledger {
        database_url: SecretString::from("sqlite:///nonexistent/demo.db"),
        password_key: SecretString::from("a-stand-in-key-of-at-least-32-bytes-long"),
    };
    let api_key = SecretString::from("stand-in-api-key");
    let admin = SocketAddr::new(DEFAULT_LISTEN.ip(), 0);
    let preset = preset(
        DEFAULT_LISTEN,
        admin,
        "https://127.0.0.1:9",
        None,
        &api_key,
        &ledger,
    );
    let settings = Settings::load_layered(preset, config, env)?;
    let format = settings.log_format().unwrap_or(LogFormat::Pretty);
    Ok((
        format,
        settings.log.filter.clone(),
        settings.tracing.clone(),
    ))
}

/// A random API key for the demo (32 characters of `A-Z a-z 0-9`).
pub fn generate_api_key() -> Result<SecretString, getrandom::Error> {
    crate::random::alphanumeric(32)
}

/// Starts both, prints what to curl, and serves until `shutdown` completes. The broker's
/// settings are the demo's [`preset`], then the `--config` file, then `env`
/// (`GIROIDENT_BROKER_*`), then `--listen`.
pub async fn run(
    options: DemoOptions,
    env: impl IntoIterator<Item = (String, String)>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), DemoError> {
    let authority = SimAuthority::fresh(options.sim_listen.ip())?;
    let started = sim::start(SimConfig {
        listen: options.sim_listen,
        tls: Some(authority.tls.clone()),
        ..SimConfig::default()
    })
    .await;
    let sim = match started {
        Ok(sim) => sim,
        Err(source) => {
            authority.remove();
            return Err(DemoError::Simulator {
                addr: options.sim_listen,
                source,
            });
        }
    };
    let listen = options.listen.unwrap_or(DEFAULT_LISTEN);
    let admin_listen = SocketAddr::new(listen.ip(), 0);
    let (ledger, ledger_path) = match Ledger::fresh() {
        Ok(fresh) => fresh,
        Err(_) => {
            sim.shutdown().await;
            authority.remove();
            return Err(DemoError::NoRandomness);
        }
    };
    let preset = preset(
        listen,
        admin_listen,
        &sim.base_url(),
        Some(&authority.ca_file),
        &options.api_key,
        &ledger,
    );
    let mut ledger_note = ledger_path.display().to_string();
    let mut demo_key_works = true;
    let built = match Settings::load_layered(preset, options.config.as_deref(), env) {
        Ok(mut settings) => {
            if let Some(listen) = options.listen {
                settings.server.listen = listen.to_string();
            }
            // Callers from the file or the environment replace the demo caller, and its key
            // with it: printing that key would hand out curls that all answer 401.
            let digest = sha256(options.api_key.expose_secret().as_bytes());
            demo_key_works = settings.auth.disabled
                || settings
                    .auth
                    .callers
                    .iter()
                    .any(|caller| caller.key_digest() == Some(digest));
            if settings.identities.database_url.expose_secret()
                != ledger.database_url.expose_secret()
            {
                ledger_note = "identities.database_url, as configured".to_owned();
            }
            Application::build(&settings).await.map_err(DemoError::from)
        }
        Err(err) => Err(err.into()),
    };
    let app = match built {
        Ok(app) => app,
        Err(err) => {
            sim.shutdown().await;
            authority.remove();
            return Err(err);
        }
    };
    println!(
        "{}",
        instructions(
            app.local_addr(),
            app.admin_addr(),
            &sim.base_url(),
            &authority.ca_file,
            demo_key_works.then(|| options.api_key.expose_secret()),
            &ledger_note,
        )
    );
    app.run_until_stopped(shutdown).await;
    sim.shutdown().await;
    authority.remove();
    // The demo's ledger describes users of a simulator that is gone now.
    for suffix in ["", "-wal", "-shm"] {
        let mut file = ledger_path.clone().into_os_string();
        file.push(suffix);
        let _ = std::fs::remove_file(file);
    }
    Ok(())
}

/// The demo simulator's certificate authority: made fresh for each run, its certificate in a
/// file of a fresh temporary directory (the broker's `finapi.ca_file`, and curl's `--cacert`),
/// removed at exit. Its key stays in memory.
struct SimAuthority {
    tls: sim::SimTls,
    dir: PathBuf,
    ca_file: PathBuf,
}

impl SimAuthority {
    /// An authority and a server certificate for 127.0.0.1, localhost and `ip` (the
    /// simulator's address, which its URL names).
    fn fresh(ip: std::net::IpAddr) -> Result<Self, DemoError> {
        let ca = sim::SimCa::generate().map_err(DemoError::Tls)?;
        let ip = ip.to_string();
        let mut names = sim::LOCAL_NAMES.to_vec();
        if !names.contains(&ip.as_str()) {
            names.push(&ip);
        }
        let tls = ca.issue(&names).map_err(DemoError::Tls)?;
        let dir = std::env::temp_dir().join(format!(
            "giroident-broker-demo-{}",
            uuid::Uuid::new_v4().simple()
        ));
        let ca_file = dir.join("simulator-ca.pem");
        std::fs::create_dir(&dir)
            .and_then(|()| std::fs::write(&ca_file, ca.cert_pem()))
            .map_err(|source| DemoError::CaFile {
                path: ca_file.clone(),
                source,
            })?;
        Ok(Self { tls, dir, ca_file })
    }

    fn remove(&self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn instructions(
    broker: SocketAddr,
    admin: SocketAddr,
    sim_url: &str,
    ca_file: &Path,
    api_key: Option<&str>,
    ledger: &str,
) -> String {
    let b = format!("http://{broker}");
    let ca = ca_file.display();
    let mut text = String::new();
    let _ = writeln!(text, "giroident-broker demo");
    let _ = writeln!(text, "  broker:    {b}");
    let key_header = match api_key {
        Some(key) => {
            let _ = writeln!(text, "  API key:   {key}   (caller \"demo\", both flows)");
            format!("'X-Api-Key: {key}'")
        }
        None => {
            let _ = writeln!(
                text,
                "  API key:   a key of the callers you configured (auth.callers replaces the demo caller): set API_KEY"
            );
            "\"X-Api-Key: $API_KEY\"".to_owned()
        }
    };
    let _ = writeln!(
        text,
        "  simulator: {sim_url}   (finAPI stand-in over HTTPS; call counts at {sim_url}/__sim/stats)"
    );
    let _ = writeln!(
        text,
        "  CA:        {ca}   (the simulator's fresh certificate authority: finapi.ca_file, curl --cacert)"
    );
    let _ = writeln!(text, "  metrics:   http://{admin}/metrics");
    let _ = writeln!(
        text,
        "  ledger:    {ledger}   (the finAPI identities this demo makes; fresh for this run, removed at exit)"
    );
    let _ = writeln!(text, "\nStandalone flow (Process Controller):");
    let _ = writeln!(
        text,
        "  curl -s -X POST {b}/kyc-sessions -H {key_header} -H 'Content-Type: application/json' \\\n    -d '{{\"flow\":\"standalone\",\"clientReference\":\"customer-4711\"}}'"
    );
    let _ = writeln!(
        text,
        "\nAccess flow (a finAPI user, reused for the same clientReference):"
    );
    let _ = writeln!(
        text,
        "  curl -s -X POST {b}/kyc-sessions -H {key_header} -H 'Content-Type: application/json' \\\n    -d '{{\"flow\":\"access\",\"clientReference\":\"customer-4711\",\"email\":\"jane@example.com\"}}'"
    );
    let _ = writeln!(
        text,
        "  curl -s {b}/identities/customer-4711 -H {key_header}            # its record"
    );
    let _ = writeln!(
        text,
        "  curl -s -i -X DELETE {b}/identities/customer-4711 -H {key_header}  # delete it"
    );
    let _ = writeln!(
        text,
        "\nCheck a token with the simulator, then delete its user:"
    );
    let _ = writeln!(
        text,
        "  curl -s --cacert {ca} {sim_url}/api/v2/users -H \"Authorization: Bearer $TOKEN\""
    );
    let _ = writeln!(
        text,
        "  curl -s -i -X DELETE {b}/kyc-sessions/current -H {key_header} -H \"Authorization: Bearer $TOKEN\""
    );
    let _ = write!(text, "\nPress Ctrl-C to stop.");
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn the_demos_logs_and_traces_follow_its_configuration() {
        let (format, filter, tracing) = telemetry_settings(None, vars(&[])).unwrap();
        assert_eq!((format, filter.as_str()), (LogFormat::Pretty, "info"));
        assert_eq!(tracing.traces_url(), None);

        let (format, filter, tracing) = telemetry_settings(
            None,
            vars(&[
                ("GIROIDENT_BROKER_LOG__FORMAT", "json"),
                ("GIROIDENT_BROKER_LOG__FILTER", "debug"),
                ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:4318"),
            ]),
        )
        .unwrap();
        assert_eq!((format, filter.as_str()), (LogFormat::Json, "debug"));
        assert_eq!(
            tracing.traces_url().as_deref(),
            Some("http://127.0.0.1:4318/v1/traces")
        );

        let err = telemetry_settings(None, vars(&[("OTEL_TRACES_SAMPLER", "never")])).unwrap_err();
        assert!(err.mentions("tracing.sampler"), "{err}");
    }
}
