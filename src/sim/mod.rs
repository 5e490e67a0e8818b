//! A local simulator of the finAPI endpoints the broker uses (see `finapi-reference.md`).
//!
//! It is written from the reference alone and imports nothing else of this crate, so that the
//! broker and its tests cannot misread finAPI the same way. Start it with [`start`] (tests,
//! demos) or [`run`] (the `sim` subcommand), over plain HTTP or, with [`SimConfig::tls`], over
//! HTTPS like finAPI (a [`SimCa`] makes the certificates); steer it through [`SimHandle`] or the
//! admin API:
//!
//! | call | effect |
//! |---|---|
//! | `GET /__sim/faults` | the active [`FaultRule`]s |
//! | `POST /__sim/faults` | adds one rule (JSON), `201`; `400` for an invalid rule |
//! | `DELETE /__sim/faults` | removes all rules, `204` |
//! | `POST /__sim/revoke-tokens` | invalidates every access and refresh token, `204` |
//! | `POST /__sim/clients/{clientId}/secret` | body `{"clientSecret":"…"}`: changes the client's secret and revokes its client tokens, as finAPI's `changeClientCredentials` does (user tokens stay valid), `204`; `404` for an unknown client, `400` for an empty secret |
//! | `GET /__sim/stats` | [`Stats`] as JSON; over HTTPS also `"connections": {"accepted":N,"tlsHandshakes":N,"h2":N}` ([`ConnectionStats`]) |
//! | `DELETE /__sim/stats` | resets the stats and the connection counters, `204` |
//! | `GET /__sim/psu` | [`PsuHeaders`]: the `PSU-*` headers (and `traceparent`) of the last 64 calls per endpoint |
//! | `DELETE /__sim/psu` | forgets them, `204` |
//!
//! Where the reference is silent, the simulator
//! - keeps one user namespace for all clients, and any known client may log a user in;
//! - reports `expires_in` rounded up, so a token still valid never shows `0` ("never expires");
//! - returns the same access token to every grant of the same client+user while it is valid
//!   (exchanges included), and one refresh token per client+user that lives as long as the user;
//!   the `refresh_token` grant answers without a new refresh token;
//! - checks client credentials before the grant, and bearer tokens before the body;
//! - over HTTPS offers HTTP/2 by ALPN besides HTTP/1.1 (unless [`SimTls::http1_only`]), with at
//!   most [`H2_MAX_CONCURRENT_STREAMS`] streams per connection (assumed: the reference says nothing
//!   of HTTP/2; 128 is what common load balancers allow);
//! - answers an invalid `X-Request-Id` (over 255 characters or not visible ASCII) with `400`
//!   under a fresh `selfgen-` id, and unknown paths with `404 UNKNOWN_ENTITY`, not counted.

mod admin;
mod api;
mod faults;
mod layer;
mod state;
mod stats;
mod tls;
mod wire;

use std::future::Future;
use std::io;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::routing::{get, post};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

pub use faults::{ANY_ENDPOINT, FaultRule};
pub(crate) use layer::Endpoint;
#[cfg(test)]
pub(crate) use layer::Grant;
pub use state::SimState;
pub use stats::{
    CALL_LOG_REQUEST_IDS, ConnectionStats, PSU_LOG_PER_ENDPOINT, PsuHeaders, PsuRecord, Stats,
};
pub use tls::{LOCAL_NAMES, SimCa, SimTls, SimTlsError};

/// Id of the client a default [`SimConfig`] knows.
pub const DEMO_CLIENT_ID: &str = "demo-client";
/// Secret of the client a default [`SimConfig`] knows.
pub const DEMO_CLIENT_SECRET: &str = "demo-client-secret";

/// Longest a client may take for its TLS handshake.
const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Streams one HTTP/2 connection may carry at once (SETTINGS_MAX_CONCURRENT_STREAMS, RFC 9113
/// section 6.5.2); nginx and AWS load balancers default to 128. A client that needs more must
/// queue or open another connection.
pub const H2_MAX_CONCURRENT_STREAMS: u32 = 128;

/// How often expired tokens, users and processes are dropped.
const SWEEP_INTERVAL: Duration = Duration::from_secs(1);

/// Configuration of one simulator.
#[derive(Clone, Debug)]
pub struct SimConfig {
    /// Address to listen on; port 0 picks a free port.
    pub listen: SocketAddr,
    /// The finAPI clients the simulator knows.
    pub clients: Vec<SimClient>,
    /// Lifetime of client tokens; `Duration::ZERO` means they never expire (`expires_in` 0).
    /// A client's own lifetime ([`SimClient::client_token_ttl`]) wins.
    pub client_token_ttl: Duration,
    /// Lifetime of user tokens; `Duration::ZERO` means they never expire (`expires_in` 0).
    /// A client's own lifetime ([`SimClient::user_token_ttl`]) wins.
    pub user_token_ttl: Duration,
    /// How long a process token can be exchanged; `Duration::ZERO` means forever.
    pub process_token_ttl: Duration,
    /// Bound of each table (users, tokens, processes). When a table is full, expired entries
    /// are swept; if it is still full the call answers `500 UNEXPECTED_ERROR`.
    pub max_entries: usize,
    /// Fault rules active from the start.
    pub faults: Vec<FaultRule>,
    /// Serve HTTPS with this certificate; `None` serves plain HTTP.
    pub tls: Option<SimTls>,
}

impl Default for SimConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from((Ipv4Addr::LOCALHOST, 0)),
            clients: vec![SimClient::new(DEMO_CLIENT_ID, DEMO_CLIENT_SECRET)],
            client_token_ttl: Duration::from_secs(3600),
            user_token_ttl: Duration::from_secs(3600),
            process_token_ttl: Duration::from_secs(7 * 24 * 3600),
            max_entries: 1_000_000,
            faults: Vec::new(),
            tls: None,
        }
    }
}

/// A finAPI client known to the simulator (finAPI issues one per product and environment,
/// each with its own secret).
#[derive(Clone, Debug)]
pub struct SimClient {
    /// `client_id`.
    pub id: String,
    /// `client_secret`.
    pub secret: String,
    /// Lifetime of this client's client tokens, instead of [`SimConfig::client_token_ttl`].
    pub client_token_ttl: Option<Duration>,
    /// Lifetime of the user tokens issued through this client, instead of
    /// [`SimConfig::user_token_ttl`].
    pub user_token_ttl: Option<Duration>,
}

impl SimClient {
    /// A client with the simulator's token lifetimes.
    pub fn new(id: &str, secret: &str) -> Self {
        Self {
            id: id.to_owned(),
            secret: secret.to_owned(),
            client_token_ttl: None,
            user_token_ttl: None,
        }
    }
}

/// The simulator's routes, finAPI's and `/__sim/`, for in-process use. Expired entries are
/// swept when tables fill up; [`start`] also sweeps periodically.
pub fn router(state: SimState) -> Router {
    Router::new()
        .route("/api/v1/processes", post(api::create_processes))
        .route(
            "/api/v1/processes/{process_token}",
            get(api::exchange_process),
        )
        .route("/api/v2/oauth/token", post(api::token))
        .route(
            "/api/v2/users",
            post(api::create_user)
                .get(api::get_user)
                .delete(api::delete_user),
        )
        .merge(admin::router())
        .fallback(api::not_found)
        .method_not_allowed_fallback(api::method_not_allowed)
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            layer::around,
        ))
        .with_state(state)
}

/// Binds `config.listen` and serves the simulator (HTTPS when `config.tls` is set) in a
/// background task until [`SimHandle::shutdown`] is called or the handle is dropped.
pub async fn start(config: SimConfig) -> io::Result<SimHandle> {
    let listener = tokio::net::TcpListener::bind(config.listen).await?;
    let addr = listener.local_addr()?;
    let state = SimState::new(&config);
    let app = router(state.clone());
    let (stop, stopped) = oneshot::channel::<()>();
    let sweeper_state = state.clone();
    let scheme = if config.tls.is_some() {
        "https"
    } else {
        "http"
    };
    let tls = config.tls;
    let counted = state.clone();
    let server = tokio::spawn(async move {
        // A dropped handle stops the simulator too.
        let stopped = async {
            let _ = stopped.await;
        };
        let serve = async move {
            match tls {
                Some(tls) => {
                    serve_tls(listener, app, tls.acceptor(), counted, stopped).await;
                    Ok(())
                }
                None => {
                    axum::serve(listener, app)
                        .with_graceful_shutdown(stopped)
                        .await
                }
            }
        };
        tokio::select! {
            result = serve => result,
            () = sweep_forever(sweeper_state) => Ok(()),
        }
    });
    tracing::info!(%addr, scheme, "finAPI simulator listening");
    Ok(SimHandle {
        addr,
        scheme,
        state,
        stop,
        server,
    })
}

/// Serves HTTPS: each accepted connection is counted, then gets its TLS handshake (at most
/// [`TLS_HANDSHAKE_TIMEOUT`]), counted with its ALPN choice, and HTTP/2 or HTTP/1.1 (hyper-util
/// tells them apart by the HTTP/2 preface). Stops accepting when `stopped` completes and waits
/// for the open connections' requests.
async fn serve_tls(
    listener: tokio::net::TcpListener,
    app: Router,
    acceptor: tokio_rustls::TlsAcceptor,
    state: SimState,
    stopped: impl Future<Output = ()>,
) {
    let mut http = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    http.http2()
        .max_concurrent_streams(H2_MAX_CONCURRENT_STREAMS);
    let http = Arc::new(http);
    let graceful = GracefulShutdown::new();
    tokio::pin!(stopped);
    loop {
        let stream = tokio::select! {
            () = &mut stopped => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _peer)) => stream,
                Err(error) => {
                    // Running out of file descriptors must not spin the loop.
                    tracing::warn!(%error, "simulator accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        if let Some(counters) = state.connection_counters() {
            counters.accepted();
        }
        let _ = stream.set_nodelay(true);
        let acceptor = acceptor.clone();
        let service = TowerToHyperService::new(app.clone());
        let watcher = graceful.watcher();
        let http = http.clone();
        let state = state.clone();
        tokio::spawn(async move {
            let tls =
                match tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                    Ok(Ok(tls)) => tls,
                    // A client that refuses the certificate ends here; tests count these.
                    Ok(Err(error)) => {
                        tracing::debug!(%error, "simulator TLS handshake failed");
                        return;
                    }
                    Err(_) => {
                        tracing::debug!("simulator TLS handshake timed out");
                        return;
                    }
                };
            if let Some(counters) = state.connection_counters() {
                counters.handshake(tls.get_ref().1.alpn_protocol() == Some(b"h2"));
            }
            let connection = watcher.watch(http.serve_connection(TokioIo::new(tls), service));
            if let Err(error) = connection.await {
                tracing::debug!(%error, "simulator connection ended with an error");
            }
        });
    }
    drop(listener);
    graceful.shutdown().await;
}

/// Runs a simulator until `shutdown` completes, then stops it gracefully; for the `sim`
/// subcommand, e.g. `run(config, async { let _ = tokio::signal::ctrl_c().await; })`.
pub async fn run(config: SimConfig, shutdown: impl Future<Output = ()>) -> io::Result<()> {
    let handle = start(config).await?;
    shutdown.await;
    handle.shutdown().await;
    Ok(())
}

async fn sweep_forever(state: SimState) {
    let mut interval = tokio::time::interval(SWEEP_INTERVAL);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        interval.tick().await;
        state.sweep();
    }
}

/// A running simulator.
pub struct SimHandle {
    addr: SocketAddr,
    scheme: &'static str,
    state: SimState,
    stop: oneshot::Sender<()>,
    server: JoinHandle<io::Result<()>>,
}

impl SimHandle {
    /// The bound address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://IP:PORT`, or `https://IP:PORT` when serving TLS: the Access and the Process
    /// Controller base URL.
    pub fn base_url(&self) -> String {
        format!("{}://{}", self.scheme, self.addr)
    }

    /// TCP connections accepted when serving TLS since start or the last stats reset, whether
    /// their handshake succeeded or not (0 over plain HTTP): shows how often a client tried.
    pub fn tls_connections(&self) -> u64 {
        self.state
            .connection_stats()
            .map_or(0, |connections| connections.accepted)
    }

    /// Connections and TLS handshakes as `GET /__sim/stats` shows them under `connections`;
    /// `None` over plain HTTP.
    pub fn connection_stats(&self) -> Option<ConnectionStats> {
        self.state.connection_stats()
    }

    /// The shared state, e.g. to serve the same simulator through [`router`] as well.
    pub fn state(&self) -> &SimState {
        &self.state
    }

    /// The `PSU-*` headers of the last calls per endpoint, as `GET /__sim/psu` shows them.
    pub fn psu_headers(&self) -> PsuHeaders {
        self.state.psu_headers()
    }

    /// A snapshot of the call counters, as `GET /__sim/stats` shows them (without its
    /// `connections` entry: see [`SimHandle::connection_stats`]).
    pub fn stats(&self) -> Stats {
        self.state.stats()
    }

    /// The calls made under a caller-given request id: see [`SimState::calls_of`].
    pub fn calls_of(&self, request_id: &str) -> Vec<(String, String)> {
        self.state.calls_of(request_id)
    }

    /// Sets all counters (calls and connections) back to zero and empties the call log.
    pub fn reset_stats(&self) {
        self.state.reset_stats();
    }

    /// Adds a fault rule. Unlike `POST /__sim/faults` this does not validate it; see
    /// [`FaultRule::validate`].
    pub fn add_fault(&self, rule: FaultRule) {
        self.state.add_fault(rule);
    }

    /// Removes every fault rule.
    pub fn clear_faults(&self) {
        self.state.clear_faults();
    }

    /// Invalidates every issued access and refresh token, as if finAPI had revoked them.
    pub fn revoke_all_tokens(&self) {
        self.state.revoke_all_tokens();
    }

    /// Changes a client's secret and revokes its client tokens, as
    /// `POST /__sim/clients/{clientId}/secret` does; `false` for an unknown client.
    pub fn change_client_secret(&self, client_id: &str, secret: &str) -> bool {
        self.state.change_client_secret(client_id, secret)
    }

    /// Stops accepting connections and waits for open requests to finish.
    pub async fn shutdown(self) {
        let _ = self.stop.send(());
        match self.server.await {
            Ok(Ok(())) => {}
            Ok(Err(error)) => tracing::warn!(%error, "finAPI simulator stopped with an error"),
            Err(error) => tracing::warn!(%error, "finAPI simulator task failed"),
        }
    }
}
