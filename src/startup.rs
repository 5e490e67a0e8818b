//! Building and running the broker: config in, a bound listener out, served until a shutdown
//! signal, then drained.

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use secrecy::ExposeSecret;
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, watch};

use crate::api::auth::Callers;
use crate::api::{self, AppState, Readiness, SharedState};
use crate::config::{ConfigError, Settings};
use crate::finapi::{self, InvalidBaseUrl};
use crate::flows::Flows;
use crate::flows::identities::IdentitySettings;
use crate::flows::reserved::{self, ReservedIntents};
use crate::identities::keys::{PasswordKey, PasswordKeys, SharedPasswordKeys};
use crate::identities::{IdentityStore, SqliteSync};
use crate::reload::Reloader;

/// Why the broker could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartupError {
    /// The HTTP client for finAPI could not be built.
    #[error("cannot build the finAPI HTTP client")]
    HttpClient(#[source] reqwest::Error),
    /// A client's CA bundle (`key`: `finapi.ca_file` or `finapi.clients.NAME.ca_file`) could
    /// not be read at start (it was usable when the configuration was loaded).
    #[error("cannot use {key}")]
    CaFile {
        key: String,
        #[source]
        source: crate::tls::CaFileError,
    },
    /// A finAPI base URL is unusable.
    #[error(transparent)]
    BaseUrl(#[from] InvalidBaseUrl),
    /// The listen address is invalid.
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    /// The identity ledger could not be opened (unreachable, or a schema newer than this
    /// binary).
    #[error("cannot open the identity ledger (identities.database_url)")]
    Store(#[source] crate::identities::StoreError),
    /// The SQLite ledger's directory does not exist: SQLite creates the file, never its
    /// directory, and says only "unable to open database file".
    #[error(
        "cannot open the identity ledger (identities.database_url): the directory of its SQLite \
         file does not exist; create it, or mount the volume there"
    )]
    SqliteDirectoryMissing(#[source] crate::identities::StoreError),
    /// The listener could not be bound.
    #[error("cannot listen on {addr}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

/// A broker whose listener is bound (so its port is known) but not yet serving.
pub struct Application {
    listener: TcpListener,
    addr: SocketAddr,
    router: axum::Router,
    admin_listener: TcpListener,
    admin_addr: SocketAddr,
    admin_router: axum::Router,
    readiness: Readiness,
    drain: Duration,
    header_read_timeout: Duration,
    flows: Arc<Flows>,
    reloader: Arc<Reloader>,
}

/// The HTTP clients for finAPI: one trusting the system's roots only, first, and one per
/// distinct `ca_file` of the named clients (a client's trusted roots are fixed when it is
/// built). Clients that share a `ca_file` share connections.
fn finapi_http_clients(
    settings: &Settings,
) -> Result<Vec<(Option<std::path::PathBuf>, reqwest::Client)>, StartupError> {
    let build = |extra_roots: &[_]| {
        finapi::http_client(
            Duration::from_millis(settings.finapi.connect_timeout_ms),
            Duration::from_millis(settings.finapi.request_timeout_ms),
            settings.finapi.http2,
            extra_roots,
        )
        .map_err(StartupError::HttpClient)
    };
    let mut clients = vec![(None, build(&[])?)];
    for client in settings.finapi_clients() {
        let Some(ca_file) = client.ca_file else {
            continue;
        };
        if clients
            .iter()
            .any(|(file, _)| file.as_ref() == Some(&ca_file))
        {
            continue;
        }
        let key = if settings.finapi.has_single_client()
            && client.name == crate::config::DEFAULT_CLIENT
        {
            "finapi.ca_file".to_owned()
        } else {
            format!("finapi.clients.{}.ca_file", client.name)
        };
        let roots = crate::tls::read_ca_file(&ca_file)
            .map_err(|source| StartupError::CaFile { key, source })?;
        clients.push((Some(ca_file), build(&roots)?));
    }
    Ok(clients)
}

impl Application {
    /// Builds the upstream clients, the cache and the router, and binds the listener.
    pub async fn build(settings: &Settings) -> Result<Self, StartupError> {
        let http = finapi_http_clients(settings)?;
        let identities = identity_settings(settings).await?;
        let flows = Arc::new(Flows::new(
            settings,
            |ca_file| {
                http.iter()
                    .find(|(file, _)| file.as_deref() == ca_file)
                    .map_or_else(|| http[0].1.clone(), |(_, client)| client.clone())
            },
            identities,
        )?);
        let readiness = Readiness::new();
        let callers = Arc::new(Callers::from_settings(settings));
        if callers.disabled() {
            tracing::warn!(
                "authentication is disabled (auth.disabled = true): anyone who reaches the broker can start KYC sessions"
            );
        }
        let limits = &settings.limits;
        let read_timeout = Duration::from_secs(limits.read_timeout_secs);
        let state = AppState::new(SharedState {
            flows: flows.clone(),
            default_flow: settings.default_flow(),
            request_timeout: Duration::from_secs(settings.server.request_timeout_secs),
            readiness: readiness.clone(),
            callers: callers.clone(),
            in_flight: Arc::new(Semaphore::new(
                usize::try_from(limits.max_in_flight).unwrap_or(Semaphore::MAX_PERMITS),
            )),
            max_body_bytes: usize::try_from(limits.max_body_bytes).unwrap_or(usize::MAX),
            read_timeout,
        });
        // The recorder must be in place before the first metric is recorded.
        if crate::telemetry::metrics::handle().is_none() {
            tracing::warn!("another metrics recorder is installed: /metrics stays empty");
        }
        let (listener, addr) = bind(settings.listen_addr()?).await?;
        let (admin_listener, admin_addr) = bind(settings.admin_addr()?).await?;
        Ok(Self {
            listener,
            addr,
            admin_listener,
            admin_addr,
            admin_router: api::admin_router(state.clone()),
            router: api::router(state),
            readiness,
            drain: settings.drain(),
            header_read_timeout: read_timeout,
            reloader: Arc::new(Reloader::new(settings.clone(), callers, flows.clone())),
            flows,
        })
    }

    /// The bound address (the real port when configured with port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// The bound admin address (metrics and probes).
    pub fn admin_addr(&self) -> SocketAddr {
        self.admin_addr
    }

    /// The flows this broker runs (their resilience counters, for tests).
    pub fn flows(&self) -> Arc<Flows> {
        self.flows.clone()
    }

    /// What applies reloaded settings to this broker (see [`reload_on_sighup`]).
    pub fn reloader(&self) -> Arc<Reloader> {
        self.reloader.clone()
    }

    /// The bound port.
    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// Serves until `shutdown` completes; then `/readyz` answers 503, requests are still served
    /// for the drain period, the listener closes, and in-flight requests finish before this
    /// returns. Accept errors are logged and the loop goes on, so serving itself cannot fail.
    pub async fn run_until_stopped(self, shutdown: impl Future<Output = ()> + Send + 'static) {
        let (stop_tx, stop_rx) = watch::channel(false);
        let readiness = self.readiness.clone();
        let drain = self.drain;
        tokio::spawn(async move {
            shutdown.await;
            readiness.set_draining();
            tracing::info!(drain_secs = drain.as_secs(), "shutting down: draining");
            tokio::time::sleep(drain).await;
            tracing::info!("drain period over: finishing in-flight requests");
            let _ = stop_tx.send(true);
        });
        tracing::info!(addr = %self.addr, admin_addr = %self.admin_addr, "broker listening");
        let timeout = self.header_read_timeout;
        let reaper = tokio::spawn(crate::flows::reaper::run(
            self.flows.clone(),
            stop_rx.clone(),
        ));
        let sweeper = tokio::spawn(reserved::run_sweeper(self.flows.clone(), stop_rx.clone()));
        tokio::join!(
            serve(self.listener, self.router, timeout, stop_rx.clone()),
            serve(self.admin_listener, self.admin_router, timeout, stop_rx),
        );
        // The reaper stops with the listeners; a deletion it is in the middle of keeps its
        // lease, which expires for the next broker.
        reaper.abort();
        let _ = reaper.await;
        let _ = sweeper.await;
        // No session runs any more: the intents written ahead leave the ledger with the broker.
        self.flows.release_reserved_intents().await;
        self.flows.close_ledger().await;
        tracing::info!("broker stopped");
    }
}

/// Whether `url` names an SQLite file whose directory does not exist. Asked only after the
/// ledger failed to open, to say why; a relative path's directory is the working directory.
fn sqlite_directory_missing(url: &str) -> bool {
    let Some(rest) = url.trim().strip_prefix("sqlite:") else {
        return false;
    };
    let path = rest.trim_start_matches("//");
    let path = path.split_once('?').map_or(path, |(path, _)| path);
    std::path::Path::new(path)
        .parent()
        .is_some_and(|dir| !dir.as_os_str().is_empty() && !dir.exists())
}

/// Opens the ledger (migrating it) and reads the password keys of validated settings.
async fn identity_settings(settings: &Settings) -> Result<IdentitySettings, StartupError> {
    let i = &settings.identities;
    let sync = match i.sqlite_synchronous.as_str() {
        "normal" => SqliteSync::Normal,
        "intents" => SqliteSync::Intents,
        _ => SqliteSync::Full,
    };
    let store = IdentityStore::connect_with(&i.database_url, i.database_max_connections, sync)
        .await
        .map_err(|error| {
            if sqlite_directory_missing(i.database_url.expose_secret()) {
                StartupError::SqliteDirectoryMissing(error)
            } else {
                StartupError::Store(error)
            }
        })?;
    let keys = password_keys(settings)?;
    Ok(IdentitySettings {
        store,
        keys: SharedPasswordKeys::new(keys),
        retention: Duration::from_secs(i.retention_secs),
        retention_by_caller: std::sync::RwLock::new(retention_by_caller(settings)),
        orphan_min_age: Duration::from_secs(i.orphan_min_age_secs),
        reaper_interval: Duration::from_secs(i.reaper_interval_secs),
        reserved: Arc::new(ReservedIntents::new(
            usize::try_from(i.reserved_intents).unwrap_or(0),
            reserved::max_age(
                Duration::from_secs(i.orphan_min_age_secs),
                Duration::from_secs(settings.server.request_timeout_secs),
            ),
        )),
    })
}

/// The password keys of validated settings: `identities.password_key(_file)` the newest, then
/// `identities.previous_password_key_files`.
pub(crate) fn password_keys(settings: &Settings) -> Result<PasswordKeys, ConfigError> {
    let i = &settings.identities;
    let key = |name: &str, secret: &secrecy::SecretString| {
        PasswordKey::new(secret.clone())
            .map_err(|_| ConfigError::single(name, "must be at least 32 bytes"))
    };
    let newest = match &i.password_key {
        Some(secret) => key("identities.password_key", secret)?,
        None => {
            return Err(ConfigError::single(
                "identities.password_key",
                "must be set",
            ));
        }
    };
    let older = i
        .previous_password_keys
        .iter()
        .map(|secret| key("identities.previous_password_key_files", secret))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(PasswordKeys::new(newest, older))
}

/// The callers' own identity retentions (`auth.callers[].retention_secs`), by caller name.
pub(crate) fn retention_by_caller(settings: &Settings) -> HashMap<String, Duration> {
    settings
        .auth
        .callers
        .iter()
        .filter_map(|c| Some((c.name.clone(), Duration::from_secs(c.retention_secs?))))
        .collect()
}

async fn bind(addr: SocketAddr) -> Result<(TcpListener, SocketAddr), StartupError> {
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|source| StartupError::Bind { addr, source })?;
    let bound = listener
        .local_addr()
        .map_err(|source| StartupError::Bind { addr, source })?;
    Ok((listener, bound))
}

/// Accepts connections until `stop` turns true, then closes the listener and waits for the
/// open connections' requests to finish.
///
/// The accept loop is hyper's own rather than `axum::serve` because that has no timeout for
/// reading request headers, and a client that never finishes its headers would hold a
/// connection forever.
async fn serve(
    listener: TcpListener,
    router: axum::Router,
    header_read_timeout: Duration,
    mut stop: watch::Receiver<bool>,
) {
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(header_read_timeout);
    let graceful = GracefulShutdown::new();
    loop {
        let (stream, _peer) = tokio::select! {
            _ = stop.changed() => break,
            accepted = listener.accept() => match accepted {
                Ok(conn) => conn,
                Err(err) => {
                    // Running out of file descriptors must not spin the loop.
                    tracing::warn!(error = %err, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        let service = TowerToHyperService::new(router.clone());
        let connection = graceful.watch(http.serve_connection(TokioIo::new(stream), service));
        tokio::spawn(async move {
            if let Err(err) = connection.await {
                tracing::debug!(error = %err, "connection ended with an error");
            }
        });
    }
    drop(listener);
    graceful.shutdown().await;
}

/// Reloads the secrets and callers on every `SIGHUP`: `load` runs the loader the broker started
/// with again (same file, same environment) and the result goes to `reloader`. The handler is
/// in place when this returns, so a `SIGHUP` from then on never ends the process (its default
/// action); the returned task runs until aborted.
#[cfg(unix)]
pub fn reload_on_sighup(
    reloader: Arc<Reloader>,
    load: impl Fn() -> Result<Settings, ConfigError> + Send + Sync + 'static,
) -> std::io::Result<tokio::task::JoinHandle<()>> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut hangups = signal(SignalKind::hangup())?;
    let load = Arc::new(load);
    Ok(tokio::spawn(async move {
        while hangups.recv().await.is_some() {
            tracing::info!("SIGHUP received: reloading secrets and callers");
            // The loader reads files: off the async threads.
            let loaded = tokio::task::spawn_blocking({
                let load = load.clone();
                move || load()
            })
            .await
            .unwrap_or_else(|_| Err(ConfigError::single("(reload)", "the loader failed")));
            let _ = reloader.reload(loaded).await;
        }
    }))
}

/// Without Unix signals there is nothing to reload on: a restart applies a new configuration.
#[cfg(not(unix))]
pub fn reload_on_sighup(
    _reloader: Arc<Reloader>,
    _load: impl Fn() -> Result<Settings, ConfigError> + Send + Sync + 'static,
) -> std::io::Result<tokio::task::JoinHandle<()>> {
    Ok(tokio::spawn(async {}))
}

/// Completes on SIGTERM or Ctrl-C.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut sig) => {
                sig.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => tracing::info!("Ctrl-C received"),
        () = term => tracing::info!("SIGTERM received"),
    }
}
