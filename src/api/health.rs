//! `GET /livez` (the process is up) and `GET /readyz` (ready to serve; 503 while draining).

use axum::Json;
use axum::Router;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde_json::json;

use super::AppState;
use super::error::ApiError;

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/livez", get(livez))
        .route("/readyz", get(readyz))
}

async fn livez() -> Json<serde_json::Value> {
    Json(json!({"status": "ok"}))
}

async fn readyz(State(state): State<AppState>) -> Response {
    if state.readiness.is_ready() {
        Json(json!({"status": "ready"})).into_response()
    } else {
        ApiError::NotReady.into_response()
    }
}
