//! What every simulated call goes through: request ids, endpoint naming, fault injection,
//! error rendering and stats.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::faults::{BodyFault, FaultAction};
use super::state::SimState;
use super::stats::{Outcome, PsuRecord};
use super::wire::ApiError;

const REQUEST_ID: &str = "x-request-id";
const MAX_REQUEST_ID_LEN: usize = 255;
/// Token requests are small forms; the body is read here to learn the grant.
const MAX_TOKEN_BODY: usize = 64 * 1024;

/// `grant_type` of a token request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Grant {
    ClientCredentials,
    Password,
    RefreshToken,
}

/// A simulated finAPI endpoint, as named in stats and fault rules.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Endpoint {
    CreateProcesses,
    ExchangeProcess,
    /// `None` for a missing or unsupported grant.
    Token(Option<Grant>),
    CreateUser,
    GetUser,
    DeleteUser,
}

impl Endpoint {
    /// The token endpoint regardless of grant; also the key of a request without a known grant.
    pub(crate) const TOKEN_ANY_GRANT: &str = "POST /api/v2/oauth/token";

    /// Every stats key.
    pub(crate) const ALL_KEYS: [&str; 9] = [
        "POST /api/v1/processes",
        "GET /api/v1/processes/{processToken}",
        "POST /api/v2/oauth/token client_credentials",
        "POST /api/v2/oauth/token password",
        "POST /api/v2/oauth/token refresh_token",
        Self::TOKEN_ANY_GRANT,
        "POST /api/v2/users",
        "GET /api/v2/users",
        "DELETE /api/v2/users",
    ];

    /// The key in stats and fault rules.
    pub(crate) fn key(self) -> &'static str {
        match self {
            Self::CreateProcesses => "POST /api/v1/processes",
            Self::ExchangeProcess => "GET /api/v1/processes/{processToken}",
            Self::Token(Some(Grant::ClientCredentials)) => {
                "POST /api/v2/oauth/token client_credentials"
            }
            Self::Token(Some(Grant::Password)) => "POST /api/v2/oauth/token password",
            Self::Token(Some(Grant::RefreshToken)) => "POST /api/v2/oauth/token refresh_token",
            Self::Token(None) => Self::TOKEN_ANY_GRANT,
            Self::CreateUser => "POST /api/v2/users",
            Self::GetUser => "GET /api/v2/users",
            Self::DeleteUser => "DELETE /api/v2/users",
        }
    }

    /// The `endpoint` of an ErrorMessage: method and path template, without the grant.
    fn name(self) -> &'static str {
        match self {
            Self::Token(_) => Self::TOKEN_ANY_GRANT,
            other => other.key(),
        }
    }

    fn classify(method: &Method, path: &str) -> Option<Self> {
        let endpoint = match (method.as_str(), path) {
            ("POST", "/api/v1/processes") => Self::CreateProcesses,
            ("POST", "/api/v2/oauth/token") => Self::Token(None),
            ("POST", "/api/v2/users") => Self::CreateUser,
            ("GET", "/api/v2/users") => Self::GetUser,
            ("DELETE", "/api/v2/users") => Self::DeleteUser,
            ("GET", path) => {
                let token = path.strip_prefix("/api/v1/processes/")?;
                if token.is_empty() || token.contains('/') {
                    return None;
                }
                Self::ExchangeProcess
            }
            _ => return None,
        };
        Some(endpoint)
    }
}

/// The middleware around every route, admin ones included. A request runs to its end in a task
/// of its own, as on a real server: a client that goes away (or dies) does not stop finAPI from
/// carrying out what it received.
pub(crate) async fn around(
    State(state): State<SimState>,
    request: Request,
    next: Next,
) -> Response {
    tokio::spawn(handle(state, request, next))
        .await
        .unwrap_or_else(|_| ApiError::unexpected("the request's task failed").render("", ""))
}

async fn handle(state: SimState, request: Request, next: Next) -> Response {
    let method = request.method().clone();
    let path = request.uri().path().to_owned();
    let endpoint = Endpoint::classify(&method, &path);
    let name = endpoint.map_or_else(|| format!("{method} {path}"), |e| e.name().to_owned());
    let (request_id, id_error) = match request_id(request.headers()) {
        Ok(id) => (id, None),
        Err(error) => (selfgen_request_id(), Some(error)),
    };
    let given_id = id_error.is_none() && !request_id.starts_with("selfgen-");
    if endpoint.is_some() && given_id {
        // Remembered on arrival, so that tests can tell a request is being handled.
        state.remember_request_id(&request_id);
    }
    let mut body_fault = None;
    let psu = endpoint.map(|_| PsuRecord::from_headers(request.headers(), &request_id));
    let (response, endpoint, dropped) = match (id_error, endpoint) {
        (Some(error), _) => (error.into_response(), endpoint, false),
        (None, None) => (next.run(request).await, None, false),
        (None, Some(endpoint)) => match with_grant(request, endpoint).await {
            Ok((request, endpoint)) => {
                let (response, dropped, body) = with_faults(&state, endpoint, request, next).await;
                body_fault = body;
                (response, Some(endpoint), dropped)
            }
            Err(error) => (error.into_response(), Some(endpoint), false),
        },
    };
    let mut response = finish(response, &request_id, &name);
    if let Some(fault) = body_fault {
        response = with_body_fault(response, fault).await;
    }
    if let Some(endpoint) = endpoint {
        let outcome = if dropped {
            Outcome::Dropped
        } else {
            Outcome::Status(response.status().as_u16())
        };
        state.counters().record(endpoint.key(), outcome);
        if given_id {
            state
                .call_log()
                .record(&request_id, endpoint.key(), outcome);
        }
        if let Some(psu) = psu {
            state.psu_log().record(endpoint.key(), psu);
        }
        tracing::debug!(
            endpoint = endpoint.key(),
            ?outcome,
            request_id,
            "simulated finAPI call"
        );
    }
    if dropped {
        dropped_connection()
    } else {
        response
    }
}

/// The request id to echo: the caller's, or a made-up `selfgen-<uuid>`.
fn request_id(headers: &HeaderMap) -> Result<String, ApiError> {
    match headers.get(REQUEST_ID) {
        None => Ok(selfgen_request_id()),
        Some(value) if value.is_empty() => Ok(selfgen_request_id()),
        Some(value) => match value.to_str() {
            Ok(id) if id.len() <= MAX_REQUEST_ID_LEN => Ok(id.to_owned()),
            _ => Err(ApiError::bad_request(
                "X-Request-Id must be at most 255 visible ASCII characters",
            )),
        },
    }
}

fn selfgen_request_id() -> String {
    format!("selfgen-{}", uuid::Uuid::new_v4())
}

/// For the token endpoint, reads the form to learn the grant, which names the endpoint.
async fn with_grant(request: Request, endpoint: Endpoint) -> Result<(Request, Endpoint), ApiError> {
    if endpoint != Endpoint::Token(None) {
        return Ok((request, endpoint));
    }
    let (parts, body) = request.into_parts();
    let bytes = axum::body::to_bytes(body, MAX_TOKEN_BODY)
        .await
        .map_err(|_| ApiError::bad_request("The request body is too large or unreadable"))?;
    let grant = grant_of(&bytes);
    Ok((
        Request::from_parts(parts, Body::from(bytes)),
        Endpoint::Token(grant),
    ))
}

/// The `grant_type` of a form body; grant names need no percent-decoding.
fn grant_of(form: &[u8]) -> Option<Grant> {
    form.split(|byte| *byte == b'&')
        .filter_map(|pair| pair.strip_prefix(b"grant_type="))
        .map(|value| match value {
            b"client_credentials" => Some(Grant::ClientCredentials),
            b"password" => Some(Grant::Password),
            b"refresh_token" => Some(Grant::RefreshToken),
            _ => None,
        })
        .next()
        .flatten()
}

/// Applies the fault rules; returns the response, whether the connection is to be dropped, and
/// what is to be done to the answer's body once it is rendered.
async fn with_faults(
    state: &SimState,
    endpoint: Endpoint,
    request: Request,
    next: Next,
) -> (Response, bool, Option<BodyFault>) {
    let plan = state.faults().plan(endpoint);
    if !plan.latency.is_zero() {
        tokio::time::sleep(plan.latency).await;
    }
    let (response, dropped) = match plan.action {
        FaultAction::Handle => (next.run(request).await, false),
        FaultAction::Answer {
            status,
            retry_after,
        } => {
            let status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
            let client_auth = matches!(endpoint, Endpoint::Token(_) | Endpoint::CreateProcesses);
            (
                ApiError::injected(status, client_auth, retry_after).into_response(),
                false,
            )
        }
        FaultAction::Drop => (StatusCode::OK.into_response(), true),
        FaultAction::HandleThenDrop => (next.run(request).await, true),
    };
    (response, dropped, plan.body)
}

/// Largest rendered answer a `set` rule rewrites; the simulator's own answers are far smaller.
const MAX_REWRITTEN_BODY: usize = 1024 * 1024;
/// Size of the chunks that padding is streamed in.
const PAD_CHUNK: usize = 64 * 1024;

/// Rewrites, pads, stalls or cuts the rendered answer's body as `fault` says. The answer keeps
/// a `Content-Length` of the whole (padded) body, so a stalled body keeps the client waiting
/// and a cut one is seen as incomplete.
async fn with_body_fault(response: Response, fault: BodyFault) -> Response {
    let (mut parts, body) = response.into_parts();
    let Ok(mut bytes) = axum::body::to_bytes(body, MAX_REWRITTEN_BODY).await else {
        return dropped_connection();
    };
    if let Some(fields) = fault.set
        && let Ok(serde_json::Value::Object(mut object)) =
            serde_json::from_slice::<serde_json::Value>(&bytes)
    {
        object.extend(fields);
        bytes = serde_json::to_vec(&object).map_or(bytes, Bytes::from);
    }
    let total = (bytes.len() as u64).saturating_add(fault.pad_bytes);
    parts
        .headers
        .insert(axum::http::header::CONTENT_LENGTH, HeaderValue::from(total));
    let plan = BodyPlan {
        body: bytes,
        sent: 0,
        total,
        stall: fault.stall,
        cut_at: fault.cut_after_bytes,
    };
    let stream = futures_util::stream::unfold(plan, BodyPlan::next_chunk);
    Response::from_parts(parts, Body::from_stream(stream))
}

/// The state of a faulted body as it is streamed.
struct BodyPlan {
    body: Bytes,
    sent: u64,
    total: u64,
    stall: Option<(u64, Duration)>,
    cut_at: Option<u64>,
}

impl BodyPlan {
    async fn next_chunk(mut self) -> Option<(Result<Bytes, io::Error>, Self)> {
        if let Some((at, pause)) = self.stall
            && self.sent >= at.min(self.total)
        {
            self.stall = None;
            tokio::time::sleep(pause).await;
        }
        if self.cut_at.is_some_and(|at| self.sent >= at) {
            self.cut_at = None;
            self.total = self.sent; // nothing after the error
            // Pending once, so that hyper flushes what was sent before the error aborts the
            // connection: otherwise the client may not even see the head.
            tokio::task::yield_now().await;
            let cut = io::Error::new(io::ErrorKind::ConnectionAborted, "body cut by a fault");
            return Some((Err(cut), self));
        }
        if self.sent >= self.total {
            return None;
        }
        // The next chunk ends at the next boundary: a stall, a cut, the body, a pad chunk.
        let mut end = self.total.min(self.sent + PAD_CHUNK as u64);
        let body_len = self.body.len() as u64;
        if self.sent < body_len {
            end = end.min(body_len);
        }
        for boundary in [self.stall.map(|(at, _)| at), self.cut_at]
            .into_iter()
            .flatten()
        {
            if boundary > self.sent {
                end = end.min(boundary);
            }
        }
        let chunk = if self.sent < body_len {
            self.body.slice(self.sent as usize..end as usize)
        } else {
            Bytes::from(vec![b' '; (end - self.sent) as usize])
        };
        self.sent = end;
        Some((Ok(chunk), self))
    }
}

/// Renders a pending [`ApiError`] and sets the `X-Request-Id` header.
fn finish(mut response: Response, request_id: &str, endpoint: &str) -> Response {
    if let Some(error) = response.extensions_mut().remove::<ApiError>() {
        response = error.render(request_id, endpoint);
    }
    if let Ok(value) = HeaderValue::from_str(request_id) {
        response.headers_mut().insert(REQUEST_ID, value);
    }
    response
}

/// A response whose body fails at once: hyper then closes the connection without completing
/// a response, which the client sees as a transport error.
fn dropped_connection() -> Response {
    Response::new(Body::from_stream(FailingBody))
}

struct FailingBody;

impl futures_core::Stream for FailingBody {
    type Item = Result<Bytes, io::Error>;

    fn poll_next(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        Poll::Ready(Some(Err(io::Error::new(
            io::ErrorKind::ConnectionAborted,
            "connection dropped by a simulator fault",
        ))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grant_is_read_from_the_form() {
        assert_eq!(
            grant_of(b"client_id=a&grant_type=password&x=1"),
            Some(Grant::Password)
        );
        assert_eq!(grant_of(b"grant_type=implicit"), None);
        assert_eq!(grant_of(b""), None);
    }

    #[test]
    fn classifies_paths() {
        let get = Method::GET;
        assert_eq!(
            Endpoint::classify(&get, "/api/v1/processes/abc"),
            Some(Endpoint::ExchangeProcess)
        );
        assert_eq!(Endpoint::classify(&get, "/api/v1/processes/"), None);
        assert_eq!(Endpoint::classify(&get, "/api/v1/processes/a/b"), None);
        assert_eq!(Endpoint::classify(&Method::PUT, "/api/v2/users"), None);
    }
}
