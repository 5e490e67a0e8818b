//! finAPI Process Controller: standalone GiroIdent processes (`/api/v1/processes`).

use std::sync::Arc;

use reqwest::StatusCode;
use reqwest::header::{HOST, HeaderValue};
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};

use crate::resilience::CircuitBreaker;

use super::{
    ClientCredentials, EndUserMetadata, InvalidBaseUrl, Step, UpstreamError, checked_token, decode,
    endpoint, host_header, send,
};

/// Client of the finAPI Process Controller. Cheap to clone.
#[derive(Clone)]
pub struct ProcessControllerClient {
    http: reqwest::Client,
    processes_url: reqwest::Url,
    host: HeaderValue,
    credentials: Arc<ClientCredentials>,
    breaker: Arc<CircuitBreaker>,
    /// Whether calls carry `traceparent` (`tracing.propagate_to_finapi`).
    propagate_trace: bool,
}

impl ProcessControllerClient {
    /// A client for the Process Controller at `base_url`, acting as the given finAPI client,
    /// its calls guarded by `breaker`.
    pub fn new(
        http: reqwest::Client,
        base_url: &str,
        credentials: Arc<ClientCredentials>,
        breaker: Arc<CircuitBreaker>,
    ) -> Result<Self, InvalidBaseUrl> {
        let processes_url = endpoint(base_url, "/api/v1/processes")?;
        Ok(Self {
            http,
            host: host_header(&processes_url)?,
            processes_url,
            credentials,
            breaker,
            propagate_trace: false,
        })
    }

    /// Makes the calls carry the W3C `traceparent` of their span while spans are exported
    /// (`tracing.propagate_to_finapi`; off by default: trace ids would reach a third party).
    pub fn propagating_trace(mut self, on: bool) -> Self {
        self.propagate_trace = on;
        self
    }

    /// The circuit breaker guarding this service.
    pub fn breaker(&self) -> &CircuitBreaker {
        &self.breaker
    }

    /// `POST /api/v1/processes` for one client reference, on behalf of its end user; returns
    /// its process token.
    pub async fn create_process(
        &self,
        client_reference: &str,
        process_id: &str,
        request_id: &str,
        end_user: &EndUserMetadata,
    ) -> Result<SecretString, UpstreamError> {
        let step = Step::CreateProcess;
        let body = self
            .credentials
            .with_secret(|secret| async move {
                let body = CreateProcessBody {
                    client_id: &self.credentials.client_id,
                    client_secret: secret.secret().expose_secret(),
                    client_references: [ClientReferenceBody { client_reference }],
                    process_id,
                };
                let request = end_user.apply(
                    self.http
                        .post(self.processes_url.clone())
                        .header(HOST, self.host.clone())
                        .json(&body),
                );
                send(
                    &self.breaker,
                    self.propagate_trace,
                    step,
                    request,
                    request_id,
                    StatusCode::CREATED,
                )
                .await
            })
            .await?;
        let created: CreatedProcesses = decode(step, &body)?;
        let process_token = created
            .processes
            .into_iter()
            .find(|p| {
                p.client_reference
                    .as_deref()
                    .is_none_or(|r| r == client_reference)
            })
            .map(|p| p.process_token)
            .ok_or(UpstreamError::Protocol {
                step,
                detail: "no process for the client reference",
            })?;
        checked_token(step, process_token)
    }

    /// `GET /api/v1/processes/{processToken}?invalidate=…`: the user access token. Not
    /// idempotent: with `invalidate=true` the process token is spent by the first exchange.
    pub async fn exchange_process_token(
        &self,
        process_token: &SecretString,
        invalidate: bool,
        request_id: &str,
        end_user: &EndUserMetadata,
    ) -> Result<SecretString, UpstreamError> {
        let step = Step::ExchangeProcessToken;
        let mut url = self.processes_url.clone();
        url.path_segments_mut()
            .map_err(|()| UpstreamError::Protocol {
                step,
                detail: "base URL cannot take a path",
            })?
            .push(process_token.expose_secret());
        url.query_pairs_mut()
            .append_pair("invalidate", if invalidate { "true" } else { "false" });
        let body = send(
            &self.breaker,
            self.propagate_trace,
            step,
            end_user.apply(self.http.get(url).header(HOST, self.host.clone())),
            request_id,
            StatusCode::OK,
        )
        .await?;
        checked_token(step, decode::<ExchangedToken>(step, &body)?.access_token)
    }
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct CreateProcessBody<'a> {
    client_id: &'a str,
    client_secret: &'a str,
    client_references: [ClientReferenceBody<'a>; 1],
    process_id: &'a str,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct ClientReferenceBody<'a> {
    client_reference: &'a str,
}

#[derive(Deserialize)]
struct CreatedProcesses {
    processes: Vec<CreatedProcess>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct CreatedProcess {
    #[serde(default)]
    client_reference: Option<String>,
    process_token: SecretString,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct ExchangedToken {
    access_token: SecretString,
}
