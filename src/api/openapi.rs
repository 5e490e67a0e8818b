//! The OpenAPI 3.1 document of the API, generated from the code; served at `GET /openapi.json`
//! and checked in as `docs/openapi.json`.

use std::sync::OnceLock;

use axum::http::{HeaderValue, header};
use axum::response::{IntoResponse, Response};
use utoipa::openapi::security::{ApiKey, ApiKeyValue, HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi};

use super::error::Problem;
use super::health::HealthStatus;
use super::kyc::{CreateSessionBody, SessionBody};
use crate::config::FlowKind;

#[derive(OpenApi)]
#[openapi(
    info(
        title = "giroident-broker",
        description = "Starts finAPI GiroIdent KYC sessions for internal backends and hands out only the user's access token.",
        license(name = "MIT")
    ),
    paths(
        super::kyc::create_session,
        super::kyc::delete_current,
        super::health::livez,
        super::health::readyz,
        openapi_json
    ),
    components(schemas(CreateSessionBody, SessionBody, FlowKind, Problem, HealthStatus)),
    modifiers(&SecuritySchemes),
    tags((name = "kyc", description = "KYC sessions"), (name = "health", description = "Probes"))
)]
struct ApiDoc;

struct SecuritySchemes;

impl Modify for SecuritySchemes {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "api_key",
            SecurityScheme::ApiKey(ApiKey::Header(ApiKeyValue::with_description(
                "X-Api-Key",
                "The calling backend's API key",
            ))),
        );
        components.add_security_scheme(
            "user_token",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .description(Some("The finAPI user access token to delete"))
                    .build(),
            ),
        );
    }
}

/// The document as pretty-printed JSON (built once).
pub fn document() -> &'static str {
    static DOCUMENT: OnceLock<String> = OnceLock::new();
    DOCUMENT.get_or_init(|| {
        ApiDoc::openapi()
            .to_pretty_json()
            .unwrap_or_else(|_| "{}".to_owned())
    })
}

/// The OpenAPI document of this API.
#[utoipa::path(
    get,
    path = "/openapi.json",
    tag = "health",
    responses((status = 200, description = "The OpenAPI 3.1 document", content_type = "application/json"))
)]
pub(super) async fn openapi_json() -> Response {
    (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        )],
        document(),
    )
        .into_response()
}
