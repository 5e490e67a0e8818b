//! The broker's HTTP API. Each module owns its routes; this one assembles them with the
//! middleware every request passes through.

mod admin;
pub mod auth;
mod error;
mod extract;
mod health;
mod identities;
mod kyc;
mod openapi;
pub mod request_id;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use axum::Router;
use axum::http::header;
use axum::middleware::from_fn_with_state;
use axum::response::{IntoResponse, Response};
use tower::ServiceBuilder;
use tower_http::catch_panic::CatchPanicLayer;
use tower_http::sensitive_headers::SetSensitiveRequestHeadersLayer;

use crate::config::FlowKind;
use crate::flows::Flows;

pub use admin::admin_router;
pub use error::{ApiError, problem_type};
pub use kyc::CreateSessionBody;
pub use openapi::document as openapi_document;

/// The identity endpoints' route, the one path with a parameter; its label in metrics.
pub const IDENTITY_ROUTE: &str = "/identities/{clientReference}";

/// Every path the API serves but [`IDENTITY_ROUTE`]; used to label metrics.
pub const ROUTES: &[&str] = &[
    "/kyc-sessions",
    "/kyc-sessions/current",
    "/livez",
    "/readyz",
    "/metrics",
    "/openapi.json",
];

/// Whether the broker takes traffic; cleared when shutdown starts.
#[derive(Clone, Debug)]
pub struct Readiness(Arc<AtomicBool>);

impl Readiness {
    /// A ready state.
    pub fn new() -> Self {
        Self(Arc::new(AtomicBool::new(true)))
    }

    /// Whether `/readyz` answers 200.
    pub fn is_ready(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }

    /// From now on `/readyz` answers 503.
    pub fn set_draining(&self) {
        self.0.store(false, Ordering::Relaxed);
    }
}

impl Default for Readiness {
    fn default() -> Self {
        Self::new()
    }
}

/// What every handler shares: one pointer, cloned for every request.
#[derive(Clone)]
pub struct AppState(Arc<SharedState>);

impl AppState {
    /// The state handlers share.
    pub fn new(shared: SharedState) -> Self {
        Self(Arc::new(shared))
    }
}

impl std::ops::Deref for AppState {
    type Target = SharedState;

    fn deref(&self) -> &SharedState {
        &self.0
    }
}

/// The contents of [`AppState`].
pub struct SharedState {
    /// The GiroIdent flows.
    pub flows: Arc<Flows>,
    /// Flow used when a request names none.
    pub default_flow: FlowKind,
    /// Time budget of one request's upstream work.
    pub request_timeout: Duration,
    /// Readiness, shared with the shutdown logic.
    pub readiness: Readiness,
    /// The configured callers.
    pub callers: Arc<auth::Callers>,
    /// Permits for requests in flight (load shedding).
    pub in_flight: Arc<tokio::sync::Semaphore>,
    /// Largest accepted request body in bytes.
    pub max_body_bytes: usize,
    /// Time allowed for receiving a request body.
    pub read_timeout: Duration,
}

/// The whole API with its middleware.
pub fn router(state: AppState) -> Router {
    let kyc = kyc::router()
        .merge(identities::router())
        .route_layer(from_fn_with_state(state.clone(), auth::admit));
    Router::new()
        .merge(kyc)
        .merge(health::router())
        .route("/openapi.json", axum::routing::get(openapi::openapi_json))
        .fallback(|| async { ApiError::NotFound })
        .method_not_allowed_fallback(|| async { ApiError::MethodNotAllowed })
        // One stack, applied once: each `Router::layer` call would box every request's future
        // again. Outermost first.
        .layer(
            ServiceBuilder::new()
                .layer(SetSensitiveRequestHeadersLayer::new([
                    header::AUTHORIZATION,
                    header::HeaderName::from_static("x-api-key"),
                    // Personal data: kept out of anything that prints headers.
                    header::HeaderName::from_static("psu-ip-address"),
                ]))
                .layer(axum::middleware::from_fn(request_id::middleware))
                .layer(CatchPanicLayer::custom(|_| -> Response {
                    tracing::error!("a request handler panicked");
                    ApiError::Internal.into_response()
                })),
        )
        .with_state(state)
}
