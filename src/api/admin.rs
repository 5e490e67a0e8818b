//! The admin listener: Prometheus metrics and the health probes, on an address of its own so
//! that the gateway never exposes them.

use axum::Router;
use axum::extract::State;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;

use super::AppState;
use super::error::ApiError;
use super::health;
use crate::telemetry::metrics;

/// `/metrics`, `/livez` and `/readyz`.
pub fn admin_router(state: AppState) -> Router {
    health::router()
        .route("/metrics", get(render_metrics))
        .fallback(|| async { ApiError::NotFound })
        // Without it axum answers a wrong method with an empty 405, outside the error contract.
        .method_not_allowed_fallback(|| async { ApiError::MethodNotAllowed })
        .with_state(state)
}

async fn render_metrics(State(state): State<AppState>) -> Response {
    metrics::publish_resilience(&state.flows);
    match metrics::handle() {
        Some(handle) => (
            StatusCode::OK,
            [(
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
            )],
            handle.render(),
        )
            .into_response(),
        None => ApiError::Internal.into_response(),
    }
}
