//! The floor of the stack: the least a service on the broker's fixed stack (axum on hyper,
//! reqwest, serde_json, one tokio `current_thread` runtime) does per KYC session, measured with
//! the same script as the broker so that issue 15's instruction targets can be read against it
//! (docs/BENCHMARKS.md, "Issue 15: the floor of the stack").
//!
//! `POST /kyc-sessions` with `{"flow":"standalone","clientReference":…}` runs finAPI's
//! standalone flow (`POST /api/v1/processes`, then `GET /api/v1/processes/{token}?invalidate=true`),
//! with `{"flow":"access"}` the access flow (`POST /api/v2/users` with a client token fetched once
//! and kept, then the `password` grant), and answers `201 {"accessToken":…}`. Nothing else: no
//! authentication, no rate limits, no deadline, no retries, no ledger, no logs, no metrics, no
//! request ids, no validation beyond serde's. It is a yardstick, not a service: it holds the
//! client secret in plain memory and puts finAPI's errors through as `502`.
//!
//! Usage (the environment keys are the broker's, so `scripts/callgrind-session.sh` runs it as
//! it runs the broker): `GIROIDENT_BROKER_SERVER__LISTEN=127.0.0.1:8080
//! GIROIDENT_BROKER_FINAPI__ACCESS_URL=… GIROIDENT_BROKER_FINAPI__PROCESS_CONTROLLER_URL=…
//! GIROIDENT_BROKER_FINAPI__CLIENT_ID=… GIROIDENT_BROKER_FINAPI__CLIENT_SECRET=… floor serve`.
//! `GET /readyz` answers `200`.
#![forbid(unsafe_code)]

use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::{get, post};
use serde::{Deserialize, Serialize};
use tokio::sync::OnceCell;

struct Upstream {
    http: reqwest::Client,
    processes_url: reqwest::Url,
    token_url: reqwest::Url,
    users_url: reqwest::Url,
    client_id: String,
    client_secret: String,
    client_token: OnceCell<String>,
    next_user: std::sync::atomic::AtomicU64,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct SessionBody {
    flow: String,
    client_reference: Option<String>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct SessionAnswer {
    access_token: String,
    token_type: &'static str,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Processes {
    processes: Vec<Process>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Process {
    process_token: String,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct AccessTokenBody {
    access_token: String,
}

/// An OAuth 2.0 token answer (RFC 6749 §5.1).
#[derive(Deserialize)]
struct OAuthToken {
    access_token: String,
}

#[derive(Deserialize)]
struct CreatedUser {
    id: String,
}

type Failure = (StatusCode, &'static str);

fn bad_gateway<E>(_: E) -> Failure {
    (StatusCode::BAD_GATEWAY, "finAPI failed")
}

async fn expect_json<T: serde::de::DeserializeOwned>(
    response: reqwest::Response,
    status: StatusCode,
) -> Result<T, Failure> {
    if response.status() != status {
        return Err(bad_gateway(()));
    }
    let body = response.bytes().await.map_err(bad_gateway)?;
    serde_json::from_slice(&body).map_err(bad_gateway)
}

impl Upstream {
    async fn standalone(&self, reference: &str) -> Result<String, Failure> {
        let body = serde_json::json!({
            "clientId": self.client_id,
            "clientSecret": self.client_secret,
            "clientReferences": [{ "clientReference": reference }],
            "processId": "GIROIDENT",
        });
        let created: Processes = expect_json(
            self.http
                .post(self.processes_url.clone())
                .json(&body)
                .send()
                .await
                .map_err(bad_gateway)?,
            StatusCode::CREATED,
        )
        .await?;
        let token = created
            .processes
            .into_iter()
            .next()
            .ok_or((StatusCode::BAD_GATEWAY, "no process"))?
            .process_token;
        let mut url = self.processes_url.clone();
        url.path_segments_mut().map_err(bad_gateway)?.push(&token);
        url.query_pairs_mut().append_pair("invalidate", "true");
        let exchanged: AccessTokenBody = expect_json(
            self.http.get(url).send().await.map_err(bad_gateway)?,
            StatusCode::OK,
        )
        .await?;
        Ok(exchanged.access_token)
    }

    async fn token(&self, params: &[(&str, &str)]) -> Result<String, Failure> {
        let form = form_urlencoded::Serializer::new(String::new())
            .extend_pairs(params)
            .append_pair("client_id", &self.client_id)
            .append_pair("client_secret", &self.client_secret)
            .finish();
        let token: OAuthToken = expect_json(
            self.http
                .post(self.token_url.clone())
                .header(
                    reqwest::header::CONTENT_TYPE,
                    "application/x-www-form-urlencoded",
                )
                .body(form)
                .send()
                .await
                .map_err(bad_gateway)?,
            StatusCode::OK,
        )
        .await?;
        Ok(token.access_token)
    }

    async fn access(&self) -> Result<String, Failure> {
        let client_token = self
            .client_token
            .get_or_try_init(|| self.token(&[("grant_type", "client_credentials")]))
            .await?;
        let n = self
            .next_user
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let id = format!("floor-{}-{n}", std::process::id());
        let password = format!("floor-password-{n}");
        let created: CreatedUser = expect_json(
            self.http
                .post(self.users_url.clone())
                .bearer_auth(client_token)
                .json(&serde_json::json!({
                    "id": id,
                    "password": password,
                    "isAutoUpdateEnabled": false,
                }))
                .send()
                .await
                .map_err(bad_gateway)?,
            StatusCode::CREATED,
        )
        .await?;
        self.token(&[
            ("grant_type", "password"),
            ("username", &created.id),
            ("password", &password),
        ])
        .await
    }
}

async fn session(
    State(upstream): State<Arc<Upstream>>,
    Json(body): Json<SessionBody>,
) -> Result<(StatusCode, Json<SessionAnswer>), Failure> {
    let access_token = match (body.flow.as_str(), body.client_reference) {
        ("standalone", Some(reference)) => upstream.standalone(&reference).await?,
        ("access", _) => upstream.access().await?,
        _ => return Err((StatusCode::BAD_REQUEST, "unknown flow")),
    };
    Ok((
        StatusCode::CREATED,
        Json(SessionAnswer {
            access_token,
            token_type: "Bearer",
        }),
    ))
}

fn env(name: &str) -> Result<String, String> {
    std::env::var(name).map_err(|_| format!("{name} is not set"))
}

fn url(base: &str, path: &str) -> Result<reqwest::Url, String> {
    reqwest::Url::parse(&format!("{}{path}", base.trim_end_matches('/')))
        .map_err(|e| format!("{base}: {e}"))
}

fn main() -> Result<(), String> {
    let listen = env("GIROIDENT_BROKER_SERVER__LISTEN")?;
    let access_url = env("GIROIDENT_BROKER_FINAPI__ACCESS_URL")?;
    let process_url = env("GIROIDENT_BROKER_FINAPI__PROCESS_CONTROLLER_URL")?;
    // As the broker does: reqwest is built without a crypto provider of its own.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let http = reqwest::Client::builder()
        .no_proxy()
        .http1_only()
        .redirect(reqwest::redirect::Policy::none())
        .retry(reqwest::retry::never().max_retries_per_request(0))
        .timeout(Duration::from_secs(10))
        .tcp_nodelay(true)
        .build()
        .map_err(|e| e.to_string())?;
    let upstream = Arc::new(Upstream {
        http,
        processes_url: url(&process_url, "/api/v1/processes")?,
        token_url: url(&access_url, "/api/v2/oauth/token")?,
        users_url: url(&access_url, "/api/v2/users")?,
        client_id: env("GIROIDENT_BROKER_FINAPI__CLIENT_ID")?,
        client_secret: env("GIROIDENT_BROKER_FINAPI__CLIENT_SECRET")?,
        client_token: OnceCell::new(),
        next_user: 0.into(),
    });
    let app = axum::Router::new()
        .route("/kyc-sessions", post(session))
        .route("/readyz", get(|| async { StatusCode::OK }))
        .with_state(upstream);
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?
        .block_on(async move {
            let listener = tokio::net::TcpListener::bind(&listen)
                .await
                .map_err(|e| format!("{listen}: {e}"))?;
            axum::serve(listener, app).await.map_err(|e| e.to_string())
        })
}
