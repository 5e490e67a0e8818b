//! Building and running the broker: config in, a bound listener out, served until a shutdown
//! signal, then drained.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;

use crate::api::{self, AppState, Readiness};
use crate::config::Settings;
use crate::finapi::{self, InvalidBaseUrl};
use crate::flows::Flows;

/// Why the broker could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartupError {
    /// The HTTP client for finAPI could not be built.
    #[error("cannot build the finAPI HTTP client")]
    HttpClient(#[source] reqwest::Error),
    /// A finAPI base URL is unusable.
    #[error(transparent)]
    BaseUrl(#[from] InvalidBaseUrl),
    /// The listen address is invalid.
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
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
    readiness: Readiness,
    drain: Duration,
    flows: Arc<Flows>,
}

impl Application {
    /// Builds the upstream clients, the cache and the router, and binds the listener.
    pub async fn build(settings: &Settings) -> Result<Self, StartupError> {
        let http = finapi::http_client(
            Duration::from_millis(settings.finapi.connect_timeout_ms),
            Duration::from_millis(settings.finapi.request_timeout_ms),
        )
        .map_err(StartupError::HttpClient)?;
        let flows = Arc::new(Flows::new(settings, http)?);
        let readiness = Readiness::new();
        let state = AppState {
            flows: flows.clone(),
            default_flow: settings.default_flow(),
            request_timeout: Duration::from_secs(settings.server.request_timeout_secs),
            readiness: readiness.clone(),
        };
        let addr = settings.listen_addr()?;
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|source| StartupError::Bind { addr, source })?;
        let addr = listener
            .local_addr()
            .map_err(|source| StartupError::Bind { addr, source })?;
        Ok(Self {
            listener,
            addr,
            router: api::router(state),
            readiness,
            drain: settings.drain(),
            flows,
        })
    }

    /// The bound address (the real port when configured with port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// The flows this broker runs (their resilience counters, for tests).
    pub fn flows(&self) -> Arc<Flows> {
        self.flows.clone()
    }

    /// The bound port.
    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// Serves until `shutdown` completes; then `/readyz` answers 503, requests are still served
    /// for the drain period, and in-flight requests finish before this returns.
    pub async fn run_until_stopped(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> std::io::Result<()> {
        let readiness = self.readiness.clone();
        let drain = self.drain;
        let stop = async move {
            shutdown.await;
            readiness.set_draining();
            tracing::info!(drain_secs = drain.as_secs(), "shutting down: draining");
            tokio::time::sleep(drain).await;
            tracing::info!("drain period over: finishing in-flight requests");
        };
        tracing::info!(addr = %self.addr, "broker listening");
        axum::serve(self.listener, self.router)
            .with_graceful_shutdown(stop)
            .await?;
        tracing::info!("broker stopped");
        Ok(())
    }
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
