//! `giroident-broker demo`: the simulator and the broker in one process on loopback, with demo
//! credentials and nothing to set up.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::PathBuf;

use secrecy::{ExposeSecret, SecretString};

use crate::config::{ConfigError, Settings, sha256, to_hex};
use crate::sim::{self, DEMO_CLIENT_ID, DEMO_CLIENT_SECRET, SimConfig};
use crate::startup::{Application, StartupError};

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
    /// The demo configuration was refused (a bug).
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The broker could not start.
    #[error(transparent)]
    Startup(#[from] StartupError),
    /// The OS random source failed, so no password key could be made.
    #[error("the OS random source failed")]
    NoRandomness,
}

/// Broker settings pointing at a simulator, with the demo client, one caller `demo` holding
/// `api_key` and allowed both flows, the identity ledger at `ledger` with `password_key`, and
/// no drain period.
pub fn settings_for_simulator(
    listen: SocketAddr,
    admin_listen: SocketAddr,
    sim_url: &str,
    api_key: &SecretString,
    ledger: &Ledger,
) -> Result<Settings, ConfigError> {
    let digest = to_hex(&sha256(api_key.expose_secret().as_bytes()));
    let vars = [
        (
            "AUTH__CALLERS",
            format!(
                r#"[{{name = "demo", key_sha256 = "{digest}", flows = ["standalone", "access"]}}]"#
            ),
        ),
        ("SERVER__LISTEN", listen.to_string()),
        ("SERVER__DRAIN_SECS", "0".to_owned()),
        ("ADMIN__LISTEN", admin_listen.to_string()),
        ("FINAPI__ACCESS_URL", sim_url.to_owned()),
        ("FINAPI__PROCESS_CONTROLLER_URL", sim_url.to_owned()),
        ("FINAPI__ALLOW_INSECURE_HTTP", "true".to_owned()),
        ("FINAPI__CLIENT_ID", DEMO_CLIENT_ID.to_owned()),
        ("FINAPI__CLIENT_SECRET", DEMO_CLIENT_SECRET.to_owned()),
        (
            "IDENTITIES__DATABASE_URL",
            ledger.database_url.expose_secret().to_owned(),
        ),
        (
            "IDENTITIES__PASSWORD_KEY",
            ledger.password_key.expose_secret().to_owned(),
        ),
    ];
    Settings::load_with_env(
        None,
        vars.into_iter()
            .map(|(k, v)| (format!("{}{k}", crate::config::ENV_PREFIX), v)),
    )
}

/// Where a demo or test broker keeps its identities.
pub struct Ledger {
    /// `identities.database_url`.
    pub database_url: SecretString,
    /// `identities.password_key`.
    pub password_key: SecretString,
}

impl Ledger {
    /// A fresh SQLite file in the system's temporary directory and a random password key.
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

/// A random API key for the demo (32 characters of `A-Z a-z 0-9`).
pub fn generate_api_key() -> Result<SecretString, getrandom::Error> {
    crate::random::alphanumeric(32)
}

/// Starts both, prints what to curl, and serves until `shutdown` completes.
pub async fn run(
    listen: SocketAddr,
    sim_listen: SocketAddr,
    api_key: SecretString,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), DemoError> {
    let sim = sim::start(SimConfig {
        listen: sim_listen,
        ..SimConfig::default()
    })
    .await
    .map_err(|source| DemoError::Simulator {
        addr: sim_listen,
        source,
    })?;
    let admin_listen = SocketAddr::new(listen.ip(), 0);
    let (ledger, ledger_path) = Ledger::fresh().map_err(|_| DemoError::NoRandomness)?;
    let settings =
        settings_for_simulator(listen, admin_listen, &sim.base_url(), &api_key, &ledger)?;
    let app = Application::build(&settings).await?;
    println!(
        "{}",
        instructions(
            app.local_addr(),
            app.admin_addr(),
            &sim.base_url(),
            api_key.expose_secret(),
            &ledger_path,
        )
    );
    app.run_until_stopped(shutdown).await;
    sim.shutdown().await;
    Ok(())
}

fn instructions(
    broker: SocketAddr,
    admin: SocketAddr,
    sim_url: &str,
    api_key: &str,
    ledger: &std::path::Path,
) -> String {
    let b = format!("http://{broker}");
    let mut text = String::new();
    let _ = writeln!(text, "giroident-broker demo");
    let _ = writeln!(text, "  broker:    {b}");
    let _ = writeln!(
        text,
        "  API key:   {api_key}   (caller \"demo\", both flows)"
    );
    let _ = writeln!(
        text,
        "  simulator: {sim_url}   (finAPI stand-in; call counts at {sim_url}/__sim/stats)"
    );
    let _ = writeln!(text, "  metrics:   http://{admin}/metrics");
    let _ = writeln!(
        text,
        "  ledger:    {}   (SQLite: the finAPI identities this demo makes)",
        ledger.display()
    );
    let _ = writeln!(text, "\nStandalone flow (Process Controller):");
    let _ = writeln!(
        text,
        "  curl -s -X POST {b}/kyc-sessions -H 'X-Api-Key: {api_key}' -H 'Content-Type: application/json' \\\n    -d '{{\"flow\":\"standalone\",\"clientReference\":\"customer-4711\"}}'"
    );
    let _ = writeln!(
        text,
        "\nAccess flow (a finAPI user, reused for the same clientReference):"
    );
    let _ = writeln!(
        text,
        "  curl -s -X POST {b}/kyc-sessions -H 'X-Api-Key: {api_key}' -H 'Content-Type: application/json' \\\n    -d '{{\"flow\":\"access\",\"clientReference\":\"customer-4711\",\"email\":\"jane@example.com\"}}'"
    );
    let _ = writeln!(
        text,
        "  curl -s {b}/identities/customer-4711 -H 'X-Api-Key: {api_key}'          # its record"
    );
    let _ = writeln!(
        text,
        "  curl -s -i -X DELETE {b}/identities/customer-4711 -H 'X-Api-Key: {api_key}'  # delete it"
    );
    let _ = writeln!(
        text,
        "\nCheck a token with the simulator, then delete its user:"
    );
    let _ = writeln!(
        text,
        "  curl -s {sim_url}/api/v2/users -H \"Authorization: Bearer $TOKEN\""
    );
    let _ = writeln!(
        text,
        "  curl -s -i -X DELETE {b}/kyc-sessions/current -H 'X-Api-Key: {api_key}' -H \"Authorization: Bearer $TOKEN\""
    );
    let _ = write!(text, "\nPress Ctrl-C to stop.");
    text
}
