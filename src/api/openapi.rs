//! The OpenAPI 3.1 document of the API, generated from the code; served at `GET /openapi.json`
//! and checked in as `docs/openapi.json`.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock, PoisonError};

use axum::extract::State;
use axum::http::{HeaderValue, header};
use axum::response::{IntoResponse, Response};
use utoipa::openapi::security::{ApiKey, ApiKeyValue, HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi};

use super::AppState;
use super::error::Problem;
use super::health::HealthStatus;
use super::identities::{EventBody, IdentityBody};
use super::kyc::{CreateSessionBody, SessionBody, flow_body_schemas};
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
        super::identities::get_identity,
        super::identities::delete_identity,
        super::health::livez,
        super::health::readyz,
        openapi_json
    ),
    components(schemas(
        CreateSessionBody,
        SessionBody,
        FlowKind,
        Problem,
        HealthStatus,
        IdentityBody,
        EventBody
    )),
    modifiers(&SecuritySchemes),
    tags(
        (name = "kyc", description = "KYC sessions"),
        (name = "identities", description = "Managed finAPI identities"),
        (name = "health", description = "Probes")
    )
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

/// The document as pretty-printed JSON, for a broker whose `flows.default_flow` is
/// `default_flow` (the request body's schema depends on it) and whose only finAPI client is
/// `default` (the served document names the configured clients); built once per flow.
pub fn document(default_flow: FlowKind) -> &'static str {
    static STANDALONE: OnceLock<String> = OnceLock::new();
    static ACCESS: OnceLock<String> = OnceLock::new();
    let cell = match default_flow {
        FlowKind::Standalone => &STANDALONE,
        FlowKind::Access => &ACCESS,
    };
    cell.get_or_init(|| build(default_flow).unwrap_or_else(|_| "{}".to_owned()))
}

/// The checked-in document is a single-client broker's: `finapiClient` is `default` or absent.
fn build(default_flow: FlowKind) -> Result<String, serde_json::Error> {
    build_with(default_flow, &[Arc::from(crate::config::DEFAULT_CLIENT)])
}

fn build_with(default_flow: FlowKind, clients: &[Arc<str>]) -> Result<String, serde_json::Error> {
    let mut doc = ApiDoc::openapi();
    let components = doc.components.get_or_insert_with(Default::default);
    for (name, schema) in flow_body_schemas(default_flow, clients) {
        components
            .schemas
            .insert(name.to_owned(), serde_json::from_value(schema)?);
    }
    doc.to_pretty_json()
}

/// The OpenAPI document of this API.
#[utoipa::path(
    get,
    path = "/openapi.json",
    tag = "health",
    responses((status = 200, description = "The OpenAPI 3.1 document", content_type = "application/json"))
)]
pub(super) async fn openapi_json(State(state): State<AppState>) -> Response {
    let clients: Vec<Arc<str>> = state.flows.finapi_clients().cloned().collect();
    (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        )],
        served_document(state.default_flow, clients),
    )
        .into_response()
}

/// The document a broker serves: [`document`] with `finapiClient` limited to the configured
/// clients' names. Built once per configuration.
fn served_document(default_flow: FlowKind, clients: Vec<Arc<str>>) -> String {
    type Served = Mutex<HashMap<(FlowKind, Vec<Arc<str>>), Arc<str>>>;
    static SERVED: OnceLock<Served> = OnceLock::new();
    let served = SERVED.get_or_init(Default::default);
    let mut served = served.lock().unwrap_or_else(PoisonError::into_inner);
    let doc = served
        .entry((default_flow, clients))
        .or_insert_with_key(|(flow, clients)| {
            build_with(*flow, clients)
                .unwrap_or_else(|_| "{}".to_owned())
                .into()
        });
    doc.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The hand-written schemas pass through utoipa's model: nothing of them may be lost.
    #[test]
    fn flow_body_schemas_survive_the_document_model() {
        for default_flow in [FlowKind::Standalone, FlowKind::Access] {
            let doc: serde_json::Value =
                serde_json::from_str(document(default_flow)).expect("JSON");
            let clients = [Arc::from(crate::config::DEFAULT_CLIENT)];
            for (name, schema) in flow_body_schemas(default_flow, &clients) {
                assert_eq!(doc["components"]["schemas"][name], schema, "{name}");
            }
        }
        // A served document's clients survive too.
        let clients: Vec<Arc<str>> = vec!["live".into(), "sandbox".into()];
        let doc: serde_json::Value =
            serde_json::from_str(&served_document(FlowKind::Access, clients.clone())).unwrap();
        for (name, schema) in flow_body_schemas(FlowKind::Access, &clients) {
            assert_eq!(doc["components"]["schemas"][name], schema, "{name}");
            assert_eq!(
                schema["properties"]["finapiClient"]["enum"],
                serde_json::json!(["live", "sandbox", null])
            );
        }
    }
}
