//! Command line of giroident-broker: parses arguments and calls into the library.
#![forbid(unsafe_code)]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use giroident_broker::config::{FlowKind, LogFormat, Settings, read_secret_file};
use giroident_broker::startup::{Application, reload_on_sighup, shutdown_signal};
use giroident_broker::telemetry::{self, cause_chain};
use giroident_broker::{demo, healthcheck, sim};
use secrecy::{ExposeSecret, SecretString};

/// Every Rust allocation of the process (broker and simulator alike) goes to mimalloc instead of
/// glibc's malloc: about 10 % fewer instructions per session, for about 3 MiB more resident
/// memory, still under issue 15's 30 MiB (figures in docs/BENCHMARKS.md, "Issue 15: the
/// allocator"). SQLite's own allocations stay with glibc.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Hands out finAPI user access tokens for GiroIdent KYC checks; keeps the client secrets.
#[derive(Parser)]
#[command(name = "giroident-broker", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    /// Configuration file layered over the built-in defaults (for `demo`: over the demo's
    /// settings); environment variables GIROIDENT_BROKER_<SECTION>__<KEY> override it.
    #[arg(long, global = true, value_name = "FILE")]
    config: Option<PathBuf>,
}

#[derive(Subcommand)]
enum Command {
    /// Run the broker (the default).
    Serve,
    /// Load and validate the configuration, report every problem, and exit.
    CheckConfig,
    /// Print the OpenAPI 3.1 document of the API (as checked in at docs/openapi.json).
    Openapi,
    /// Commands that run on the default multi-threaded runtime.
    #[command(flatten)]
    Tool(Tool),
}

#[derive(Subcommand)]
enum Tool {
    /// Run the finAPI simulator and the broker together on loopback with demo credentials.
    Demo {
        /// Broker address [default: 127.0.0.1:8080]; wins over server.listen from --config or
        /// the environment.
        #[arg(long)]
        listen: Option<SocketAddr>,
        /// Simulator address (port 0: any free port).
        #[arg(long, default_value = "127.0.0.1:0")]
        sim_listen: SocketAddr,
        /// API key of the demo caller (default: a random one, printed at start): visible
        /// ASCII, as an `X-Api-Key` header carries it unchanged.
        #[arg(long, value_parser = demo_api_key)]
        api_key: Option<String>,
    },
    /// Run the finAPI simulator alone. The client secret comes from the environment variable
    /// GIROIDENT_SIM_CLIENT_SECRET or --client-secret-file (default: the demo secret).
    Sim {
        /// Simulator address.
        #[arg(long, default_value = "127.0.0.1:8081")]
        listen: SocketAddr,
        /// The finAPI client id the simulator knows.
        #[arg(long, default_value = sim::DEMO_CLIENT_ID)]
        client_id: String,
        /// File holding that client's secret.
        #[arg(long, value_name = "FILE")]
        client_secret_file: Option<PathBuf>,
        /// Lifetime of client tokens in seconds (0: never expire).
        #[arg(long, default_value_t = 3600)]
        client_token_ttl_secs: u64,
        /// Lifetime of user tokens in seconds (0: never expire).
        #[arg(long, default_value_t = 3600)]
        user_token_ttl_secs: u64,
        /// Most entries of each table (users, tokens, processes); a call that needs one more
        /// in a full table answers `500 UNEXPECTED_ERROR`. Raise it for load runs of more than
        /// a million finAPI users.
        #[arg(long, default_value_t = sim::SimConfig::default().max_entries,
            value_parser = parse_max_entries)]
        max_entries: usize,
        /// A further finAPI client, as `ID=SECRET_FILE[,CLIENT_TOKEN_TTL_SECS[,USER_TOKEN_TTL_SECS]]`
        /// (the lifetimes default to the options above); may be repeated.
        #[arg(long = "extra-client", value_name = "SPEC", value_parser = parse_extra_client)]
        extra_clients: Vec<sim::SimClient>,
        /// A fault rule active from the start, as JSON (the body of `POST /__sim/faults`);
        /// may be repeated.
        #[arg(long = "fault", value_name = "JSON", value_parser = parse_fault)]
        faults: Vec<sim::FaultRule>,
        // Boxed: the flags would make every other command as large.
        #[command(flatten)]
        tls: Box<SimTlsArgs>,
    },
    /// GET a health endpoint and exit 0 on a 2xx answer, 1 otherwise (for container
    /// healthchecks in images without curl).
    Healthcheck {
        /// The URL to check.
        #[arg(long, default_value = healthcheck::DEFAULT_URL)]
        url: reqwest::Url,
        /// A PEM bundle of CA certificates trusted for an https URL besides the system's roots
        /// (e.g. the simulator's authority).
        #[arg(long, value_name = "FILE")]
        ca_file: Option<PathBuf>,
    },
}

/// How the simulator serves HTTPS; without any of these it serves plain HTTP.
#[derive(clap::Args)]
struct SimTlsArgs {
    /// Serve HTTPS with this PEM certificate chain (server certificate first); needs
    /// --tls-key.
    #[arg(
        long,
        value_name = "FILE",
        requires = "tls_key",
        conflicts_with = "tls_self_signed_ca"
    )]
    tls_cert: Option<PathBuf>,
    /// The PEM private key of --tls-cert.
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// Serve HTTPS with a certificate from a fresh certificate authority made at start, and
    /// write that authority's certificate (PEM) to FILE, for the broker's finapi.ca_file. The
    /// authority's key is never written: each start makes a new one.
    #[arg(long, value_name = "FILE")]
    tls_self_signed_ca: Option<PathBuf>,
    /// A name (DNS name or IP address) the generated server certificate is valid for; may be
    /// repeated [default: 127.0.0.1 and localhost].
    #[arg(
        long = "tls-name",
        value_name = "NAME",
        requires = "tls_self_signed_ca"
    )]
    tls_names: Vec<String>,
    /// The protocols offered by ALPN: `h2` offers HTTP/2 and HTTP/1.1, `http1` only HTTP/1.1
    /// (a finAPI front without HTTP/2).
    #[arg(long, value_name = "PROTOCOLS", default_value = "h2", value_parser = ["h2", "http1"])]
    tls_alpn: String,
}

impl SimTlsArgs {
    /// The simulator's TLS, if asked for; writes the generated authority's certificate.
    fn load(self) -> Result<Option<sim::SimTls>, String> {
        let http1_only = self.tls_alpn == "http1";
        let alpn = |tls: sim::SimTls| if http1_only { tls.http1_only() } else { tls };
        if let (Some(cert), Some(key)) = (&self.tls_cert, &self.tls_key) {
            return sim::SimTls::from_pem_files(cert, key)
                .map(|tls| Some(alpn(tls)))
                .map_err(|e| format!("--tls-cert/--tls-key: {}", cause_chain(&e)));
        }
        let Some(ca_file) = self.tls_self_signed_ca else {
            return Ok(None);
        };
        let names: Vec<&str> = if self.tls_names.is_empty() {
            sim::LOCAL_NAMES.to_vec()
        } else {
            self.tls_names.iter().map(String::as_str).collect()
        };
        let fail = |e: &dyn std::error::Error| format!("--tls-self-signed-ca: {}", cause_chain(e));
        let ca = sim::SimCa::generate().map_err(|e| fail(&e))?;
        let tls = ca.issue(&names).map_err(|e| fail(&e))?;
        std::fs::write(&ca_file, ca.cert_pem()).map_err(|e| {
            format!(
                "--tls-self-signed-ca: cannot write {}: {}",
                ca_file.display(),
                e.kind()
            )
        })?;
        Ok(Some(alpn(tls)))
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command.unwrap_or(Command::Serve) {
        Command::Serve => serve(cli.config),
        Command::Openapi => {
            // The built-in `flows.default_flow`; the test comparing this copy with the served
            // document catches a change of config/default.toml.
            println!(
                "{}",
                giroident_broker::api::openapi_document(FlowKind::Standalone)
            );
            ExitCode::SUCCESS
        }
        Command::CheckConfig => match Settings::load(cli.config.as_deref()) {
            Ok(_) => {
                println!("configuration is valid");
                ExitCode::SUCCESS
            }
            Err(err) => {
                eprintln!("{err}");
                ExitCode::from(2)
            }
        },
        Command::Tool(tool) => match tokio::runtime::Runtime::new() {
            Ok(runtime) => runtime.block_on(run(tool, cli.config)),
            Err(err) => {
                eprintln!("cannot start the async runtime: {err}");
                ExitCode::FAILURE
            }
        },
    }
}

async fn run(tool: Tool, config: Option<PathBuf>) -> ExitCode {
    match tool {
        Tool::Demo {
            listen,
            sim_listen,
            api_key,
        } => {
            // The demo's settings (its preset, the --config file, the environment) decide its
            // logs and traces from the first line on.
            let (format, filter, tracing) =
                match demo::telemetry_settings(config.as_deref(), std::env::vars()) {
                    Ok(settings) => settings,
                    Err(err) => {
                        eprintln!("{err}");
                        return ExitCode::from(2);
                    }
                };
            let _logs = match telemetry::init(format, &filter, Some(&tracing)) {
                Ok(telemetry) => telemetry,
                Err(err) => {
                    eprintln!("cannot start tracing: {}", cause_chain(&err));
                    return ExitCode::FAILURE;
                }
            };
            let api_key = match api_key
                .map(SecretString::from)
                .map_or_else(demo::generate_api_key, Ok)
            {
                Ok(key) => key,
                Err(err) => {
                    eprintln!("demo failed: no API key: {err}");
                    return ExitCode::FAILURE;
                }
            };
            let options = demo::DemoOptions {
                listen,
                sim_listen,
                api_key,
                config,
            };
            match demo::run(options, std::env::vars(), shutdown_signal()).await {
                Ok(()) => ExitCode::SUCCESS,
                Err(demo::DemoError::Config(err)) => {
                    eprintln!("{err}");
                    ExitCode::from(2)
                }
                Err(err) => {
                    eprintln!("demo failed: {}", cause_chain(&err));
                    ExitCode::FAILURE
                }
            }
        }
        Tool::Sim {
            listen,
            client_id,
            client_secret_file,
            client_token_ttl_secs,
            user_token_ttl_secs,
            max_entries,
            extra_clients,
            faults,
            tls,
        } => {
            let _logs = telemetry::init(LogFormat::Auto, "info", None);
            let secret = match sim_secret(client_secret_file) {
                Ok(secret) => secret,
                Err(msg) => {
                    eprintln!("{msg}");
                    return ExitCode::from(2);
                }
            };
            let tls = match (*tls).load() {
                Ok(tls) => tls,
                Err(msg) => {
                    eprintln!("{msg}");
                    return ExitCode::from(2);
                }
            };
            let mut clients = vec![sim::SimClient::new(&client_id, &secret)];
            clients.extend(extra_clients);
            let config = sim::SimConfig {
                listen,
                clients,
                client_token_ttl: Duration::from_secs(client_token_ttl_secs),
                user_token_ttl: Duration::from_secs(user_token_ttl_secs),
                max_entries,
                faults,
                tls,
                ..sim::SimConfig::default()
            };
            match sim::run(config, shutdown_signal()).await {
                Ok(()) => ExitCode::SUCCESS,
                Err(err) => {
                    eprintln!("simulator failed: {err}");
                    ExitCode::FAILURE
                }
            }
        }
        Tool::Healthcheck { url, ca_file } => healthcheck::run(url, ca_file.as_deref()).await,
    }
}

/// The broker: configuration first (before any thread or port), then the runtime that
/// `server.worker_threads` asks for.
fn serve(config: Option<PathBuf>) -> ExitCode {
    let settings = match Settings::load(config.as_deref()) {
        Ok(settings) => settings,
        Err(err) => {
            eprintln!("{err}");
            return ExitCode::from(2);
        }
    };
    let _telemetry = match telemetry::init(
        settings.log_format().unwrap_or(LogFormat::Auto),
        &settings.log.filter,
        Some(&settings.tracing),
    ) {
        Ok(telemetry) => telemetry,
        Err(err) => {
            eprintln!("cannot start tracing: {}", cause_chain(&err));
            return ExitCode::FAILURE;
        }
    };
    let runtime = match settings.server.worker_threads {
        1 => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build(),
        0 => tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build(),
        n => tokio::runtime::Builder::new_multi_thread()
            .worker_threads(usize::try_from(n).unwrap_or(1))
            .enable_all()
            .build(),
    };
    match runtime {
        Ok(runtime) => runtime.block_on(serve_on(&settings, config)),
        Err(err) => {
            tracing::error!(error = %cause_chain(&err), "cannot start the async runtime");
            ExitCode::FAILURE
        }
    }
}

async fn serve_on(settings: &Settings, config: Option<PathBuf>) -> ExitCode {
    let app = match Application::build(settings).await {
        Ok(app) => app,
        Err(err) => {
            tracing::error!(error = %cause_chain(&err), "cannot start");
            return ExitCode::FAILURE;
        }
    };
    // A reload reads the same file and environment as the start did.
    let reloads = match reload_on_sighup(app.reloader(), move || Settings::load(config.as_deref()))
    {
        Ok(task) => task,
        Err(err) => {
            tracing::error!(error = %cause_chain(&err), "cannot handle SIGHUP");
            return ExitCode::FAILURE;
        }
    };
    app.run_until_stopped(shutdown_signal()).await;
    reloads.abort();
    ExitCode::SUCCESS
}

fn sim_secret(file: Option<PathBuf>) -> Result<String, String> {
    // The same reading as the broker's `finapi.client_secret_file`: compose hands both one file.
    if let Some(path) = file {
        return read_secret_file(&path).map(|secret| secret.expose_secret().to_owned());
    }
    Ok(std::env::var("GIROIDENT_SIM_CLIENT_SECRET")
        .unwrap_or_else(|_| sim::DEMO_CLIENT_SECRET.to_owned()))
}

/// `ID=SECRET_FILE[,CLIENT_TOKEN_TTL_SECS[,USER_TOKEN_TTL_SECS]]`; the secret file is read at
/// once (one trailing newline ignored), and only its path is named in an error.
/// The demo caller's `--api-key`: 1 or more visible ASCII characters. An empty key is a
/// missing `X-Api-Key`, white space at its ends is dropped by HTTP (RFC 9110, 5.5), and other
/// bytes do not survive every client, so the curls the demo prints would all answer `401`.
fn demo_api_key(key: &str) -> Result<String, String> {
    if !key.is_empty() && key.bytes().all(|b| b.is_ascii_graphic()) {
        Ok(key.to_owned())
    } else {
        Err("an API key is 1 or more visible ASCII characters (no spaces)".to_owned())
    }
}

fn parse_extra_client(spec: &str) -> Result<sim::SimClient, String> {
    let (id, rest) = spec
        .split_once('=')
        .filter(|(id, _)| !id.is_empty())
        .ok_or("expected ID=SECRET_FILE[,CLIENT_TOKEN_TTL_SECS[,USER_TOKEN_TTL_SECS]]")?;
    let mut parts = rest.split(',');
    let path = PathBuf::from(parts.next().unwrap_or_default());
    let secret = read_secret_file(&path)?;
    let mut client = sim::SimClient::new(id, secret.expose_secret());
    let mut ttl = |name: &str| -> Result<Option<Duration>, String> {
        parts
            .next()
            .map(|secs| {
                secs.trim()
                    .parse()
                    .map(Duration::from_secs)
                    .map_err(|_| format!("{name} must be whole seconds"))
            })
            .transpose()
    };
    client.client_token_ttl = ttl("CLIENT_TOKEN_TTL_SECS")?;
    client.user_token_ttl = ttl("USER_TOKEN_TTL_SECS")?;
    Ok(client)
}

/// `--max-entries`: a whole number of at least 1 (a table of none could hold no user).
fn parse_max_entries(value: &str) -> Result<usize, String> {
    match value.parse::<usize>() {
        Ok(n) if n > 0 => Ok(n),
        _ => Err(format!(
            "expected a whole number of at least 1, not {value:?}"
        )),
    }
}

fn parse_fault(json: &str) -> Result<sim::FaultRule, String> {
    let rule: sim::FaultRule = serde_json::from_str(json).map_err(|e| e.to_string())?;
    rule.validate()?;
    Ok(rule)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_extra_simulator_client_has_its_secret_and_lifetimes() {
        let path = std::env::temp_dir().join(format!("gib-sim-{}", std::process::id()));
        std::fs::write(&path, "extra-secret\n").unwrap();
        let spec = format!("live={},60,120", path.display());
        let client = parse_extra_client(&spec).expect("valid");
        assert_eq!(client.id, "live");
        assert_eq!(client.secret, "extra-secret");
        assert_eq!(client.client_token_ttl, Some(Duration::from_secs(60)));
        assert_eq!(client.user_token_ttl, Some(Duration::from_secs(120)));
        let plain = parse_extra_client(&format!("b={}", path.display())).expect("valid");
        assert_eq!(plain.client_token_ttl, None);
        for bad in [
            "=x".to_owned(),
            format!("c={},soon", path.display()),
            "d=/nonexistent".into(),
        ] {
            let err = parse_extra_client(&bad).unwrap_err();
            assert!(!err.contains("extra-secret"), "{err}");
        }
        std::fs::remove_file(path).unwrap();
    }
}
