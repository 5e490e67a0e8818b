//! Request ids and the per-request span: an id from the gateway's `X-Request-Id` when it is
//! safe (at most 255 characters of `A-Z a-z 0-9 - _ . : /`), a new UUID otherwise. It is echoed
//! in the response, sent to finAPI on every upstream call, put into problem bodies, and named
//! in every log line of the request, which ends with one line giving status and latency, and
//! what the handlers noted: caller, flow, finAPI client and user.

use std::cell::RefCell;
use std::sync::Arc;
use std::time::Instant;

use axum::extract::Request;
use axum::http::{HeaderName, HeaderValue};
use axum::middleware::Next;
use axum::response::Response;
use tracing::Instrument;

use crate::telemetry::metrics::{
    HTTP_DURATION, HTTP_IN_FLIGHT, HTTP_REQUESTS, HandleCache, status_label,
};

/// The request id header, in both directions and towards finAPI.
pub const HEADER: HeaderName = HeaderName::from_static("x-request-id");
/// Longest request id taken from a caller (finAPI's limit).
pub const MAX_LEN: usize = 255;

/// The request a task serves: what its log lines show, and what handlers note for its
/// `request finished` line. A task-local rather than a `tracing` span for JSON lines: a span
/// costs its creation, an enter and an exit at every poll, and a close, each a call into the
/// subscriber (about 8,000 instructions per request; docs/BENCHMARKS.md, "Issue 15: the floor
/// of the stack, and the request's log fields without a span").
struct Current {
    fields: Arc<RequestFields>,
    /// For the request's `request finished` line.
    notes: RefCell<Notes>,
}

/// What every log line of a request shows under `span` (README "Logging"): the request id,
/// method and path, and while traces are exported the W3C trace and span ids of the request's
/// server span.
pub struct RequestFields {
    id: Arc<str>,
    method: axum::http::Method,
    /// The request's path, or its route where the path holds a client reference.
    path: Box<str>,
    trace: Option<(opentelemetry::trace::TraceId, opentelemetry::trace::SpanId)>,
}

impl RequestFields {
    /// Calls `member(name, value)` for each field, in the order of the log line.
    pub fn visit(
        &self,
        mut member: impl FnMut(&'static str, &dyn std::fmt::Display) -> std::fmt::Result,
    ) -> std::fmt::Result {
        member("request_id", &self.id)?;
        member("method", &self.method)?;
        member("path", &self.path)?;
        if let Some((trace_id, span_id)) = &self.trace {
            member("trace_id", trace_id)?;
            member("span_id", span_id)?;
        }
        Ok(())
    }
}

/// The fields of the request the calling task serves, given to `f`; `None` outside a request.
pub fn with_fields<R>(f: impl FnOnce(&RequestFields) -> R) -> Option<R> {
    CURRENT.try_with(|c| f(&c.fields)).ok()
}

/// `future`, run as part of the request the calling task serves (if any): its log lines show
/// that request's fields, as when a task spawned for the request does work on its behalf. What
/// it notes is not shown in the request's `request finished` line.
pub fn in_current_request<F: Future>(future: F) -> impl Future<Output = F::Output> {
    // The request's span too, for the human-readable format (none for JSON lines).
    let future = future.instrument(tracing::Span::current());
    match CURRENT.try_with(|c| c.fields.clone()) {
        Ok(fields) => futures_util::future::Either::Left(CURRENT.scope(
            Current {
                fields,
                notes: RefCell::default(),
            },
            future,
        )),
        Err(_) => futures_util::future::Either::Right(future),
    }
}

/// What handlers say about a request for its `request finished` line. Kept here rather than
/// recorded on the request span: each `record` is a call into the subscriber, and a handler
/// finds the span through `Span::current()`, a lookup, a clone and a drop (docs/BENCHMARKS.md,
/// "Issue 15: logging at info and the request path").
#[derive(Default)]
struct Notes {
    caller: Option<Arc<str>>,
    flow: Option<&'static str>,
    finapi_client: Option<Arc<str>>,
    user_id: Option<Box<str>>,
}

fn note(f: impl FnOnce(&mut Notes)) {
    let _ = CURRENT.try_with(|c| f(&mut c.notes.borrow_mut()));
}

/// Names the authenticated caller in the request's `request finished` line and metrics.
pub fn note_caller(caller: &Arc<str>) {
    note(|n| n.caller = Some(caller.clone()));
}

/// Names the flow (`standalone`, `access`) in the request's `request finished` line.
pub fn note_flow(flow: &'static str) {
    note(|n| n.flow = Some(flow));
}

/// Names the finAPI client (configured name) in the request's `request finished` line.
pub fn note_finapi_client(client: &Arc<str>) {
    note(|n| n.finapi_client = Some(client.clone()));
}

/// Names the finAPI user id in the request's `request finished` line.
pub fn note_user_id(user_id: &str) {
    note(|n| n.user_id = Some(user_id.into()));
}

tokio::task_local! {
    static CURRENT: Current;
}

/// The request id of the request this task serves, if any.
pub fn current() -> Option<String> {
    CURRENT.try_with(|c| c.fields.id.to_string()).ok()
}

/// The trace id of the request this task serves, while spans are exported: the caller's when
/// it sent a `traceparent` (W3C Trace Context), a new one otherwise.
pub fn current_trace_id() -> Option<String> {
    CURRENT
        .try_with(|c| c.fields.trace.map(|(id, _)| id.to_string()))
        .ok()
        .flatten()
}

/// The id of the current request, as an extension for handlers.
#[derive(Debug, Clone)]
pub struct RequestId(pub Arc<str>);

/// Whether a caller-given id may be used as it is.
pub fn is_acceptable(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= MAX_LEN
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.:/".contains(&b))
}

/// Route, method, status and caller (`None` for requests no caller was found for).
type RequestLabels = (&'static str, &'static str, &'static str, Option<Arc<str>>);

/// The request metrics of one label set.
struct RequestMetrics {
    requests: metrics::Counter,
    duration: metrics::Histogram,
}

/// A place in the in-flight gauge, given back when dropped: also when the client goes away and
/// hyper drops the request's future.
struct InFlight;

impl InFlight {
    fn with_gauge(f: impl FnOnce(&metrics::Gauge)) {
        static GAUGE: HandleCache<(), metrics::Gauge> = HandleCache::new();
        GAUGE.with((), |()| metrics::gauge!(HTTP_IN_FLIGHT), f);
    }

    fn enter() -> Self {
        Self::with_gauge(|g| g.increment(1));
        Self
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        Self::with_gauge(|g| g.decrement(1));
    }
}

/// Writes the `request finished` line of a request whose future is dropped before it has an
/// answer (its client went away, or shutdown cut it off), with status 499 as nginx logs it, and
/// counts it in the request metrics so: every request ends in one such line and is counted.
/// Dropped inside the request's future, where its task-local (fields and notes) is set and its
/// span (if any) entered: tokio's task-local and tracing's `Instrumented` both drop their
/// future in scope.
struct Unanswered {
    route: &'static str,
    method: &'static str,
    started: Instant,
    answered: bool,
}

impl Drop for Unanswered {
    fn drop(&mut self) {
        if !self.answered {
            let elapsed = self.started.elapsed();
            tracing::info!(
                status = 499u16,
                latency_ms = elapsed.as_secs_f64() * 1e3,
                "request finished"
            );
            let caller = CURRENT
                .try_with(|c| c.notes.borrow().caller.clone())
                .ok()
                .flatten();
            count(self.route, self.method, status_label(499), caller, elapsed);
        }
    }
}

/// Counts a finished request in `broker_http_requests_total` and its duration.
fn count(
    route: &'static str,
    method: &'static str,
    status: &'static str,
    caller: Option<Arc<str>>,
    elapsed: std::time::Duration,
) {
    static HANDLES: HandleCache<RequestLabels, RequestMetrics> = HandleCache::new();
    HANDLES.with(
        (route, method, status, caller),
        |(route, method, status, caller)| {
            let (route, method, status) = (*route, *method, *status);
            let caller: metrics::SharedString =
                caller.as_ref().map_or_else(|| "none".into(), |c| c.to_string().into());
            RequestMetrics {
                requests: metrics::counter!(HTTP_REQUESTS, "route" => route, "method" => method, "status" => status, "caller" => caller.clone()),
                duration: metrics::histogram!(HTTP_DURATION, "route" => route, "method" => method, "status" => status, "caller" => caller),
            }
        },
        |m| {
            m.requests.increment(1);
            m.duration.record(elapsed.as_secs_f64());
        },
    );
}

/// Middleware: assigns the id, serves the request in its [`RequestFields`], logs the finished
/// request.
pub async fn middleware(mut request: Request, next: Next) -> Response {
    let given = request
        .headers()
        .get(HEADER)
        .filter(|v| v.to_str().is_ok_and(is_acceptable))
        .cloned();
    let (id, header): (Arc<str>, HeaderValue) = match given {
        // Checked above: visible ASCII only.
        Some(value) => (value.to_str().unwrap_or_default().into(), value),
        None => {
            let mut buf = uuid::Uuid::encode_buffer();
            let id = uuid::Uuid::new_v4().hyphenated().encode_lower(&mut buf);
            (
                id.into(),
                HeaderValue::from_str(id).unwrap_or(HeaderValue::from_static("")),
            )
        }
    };
    request.extensions_mut().insert(RequestId(id.clone()));
    let route = route_label(request.uri().path());
    // An identity's path holds the caller's raw client reference, which no log may hold: the
    // route's template stands in, also for an unmatched path that names the identities
    // (`//identities/…` from a base URL with a trailing slash, `/Identities/…`, `%2F`).
    let path = request.uri().path();
    let path = if route == super::IDENTITY_ROUTE || (route == "unmatched" && names_identities(path))
    {
        super::IDENTITY_ROUTE
    } else {
        path
    };
    // The exported server span is a span of its own, so that the log fields (request id, path,
    // caller, the ids below) are not exported as attributes too: each would cost conversion
    // and encoding per request (docs/BENCHMARKS.md, "Tracing (issue 14)"). It is the parent of
    // every span the request opens. The caller's trace continues here (W3C Trace Context); the
    // ids go into the log lines.
    let method = method_label(request.method());
    let (mut server_span, trace) =
        crate::telemetry::otel::server_span(request.headers(), method, route);
    // The human-readable format shows the request's fields through a span (`tracing`'s own
    // formatter); JSON lines take them from `current`, and the span is none.
    let span = if crate::telemetry::request_spans() {
        let span = tracing::info_span!(
            "request",
            request_id = &*id,
            method = request.method().as_str(),
            path = path,
            trace_id = tracing::field::Empty,
            span_id = tracing::field::Empty,
        );
        if let Some((trace_id, span_id)) = trace {
            span.record("trace_id", tracing::field::display(trace_id));
            span.record("span_id", tracing::field::display(span_id));
        }
        span
    } else {
        tracing::Span::none()
    };
    let current = Current {
        fields: Arc::new(RequestFields {
            id,
            method: request.method().clone(),
            path: path.into(),
            trace,
        }),
        notes: RefCell::default(),
    };
    let started = Instant::now();
    let in_flight = InFlight::enter();
    let run = async move {
        let mut unanswered = Unanswered {
            route,
            method,
            started,
            answered: false,
        };
        let response = next.run(request).await;
        unanswered.answered = true;
        let elapsed = started.elapsed();
        let notes = CURRENT.try_with(|c| c.notes.take()).unwrap_or_default();
        tracing::info!(
            status = response.status().as_u16(),
            latency_ms = elapsed.as_secs_f64() * 1e3,
            caller = notes.caller.as_deref(),
            flow = notes.flow,
            finapi_client = notes.finapi_client.as_deref(),
            user_id = notes.user_id.as_deref(),
            "request finished"
        );
        (response, elapsed, notes.caller)
    };
    let (mut response, elapsed, caller) = server_span
        .scope(CURRENT.scope(current, run).instrument(span))
        .await;
    drop(in_flight);
    crate::telemetry::otel::end_server_span(&mut server_span, response.status().as_u16());
    drop(server_span);
    let status = status_label(response.status().as_u16());
    count(route, method, status, caller, elapsed);
    response.headers_mut().insert(HEADER, header);
    response
}

/// The route of a path, for metric labels: the API's paths have no parameters, so a known path
/// is its own route; anything else is `unmatched` (the label set stays bounded).
fn route_label(path: &str) -> &'static str {
    if path
        .strip_prefix("/identities/")
        .is_some_and(|rest| !rest.is_empty() && !rest.contains('/'))
    {
        return super::IDENTITY_ROUTE;
    }
    super::ROUTES
        .iter()
        .find(|route| **route == path)
        .copied()
        .unwrap_or("unmatched")
}

/// Whether `path`, its percent escapes decoded, holds `identities` in any case.
fn names_identities(path: &str) -> bool {
    let bytes = path.as_bytes();
    let hex = |at: usize| bytes.get(at).and_then(|b| char::from(*b).to_digit(16));
    let mut decoded = Vec::with_capacity(bytes.len());
    let mut at = 0;
    while let Some(&b) = bytes.get(at) {
        match (b, hex(at + 1), hex(at + 2)) {
            (b'%', Some(hi), Some(lo)) => {
                decoded.push(u8::try_from(hi * 16 + lo).unwrap_or(b'%'));
                at += 3;
            }
            _ => {
                decoded.push(b);
                at += 1;
            }
        }
    }
    decoded
        .windows(b"identities".len())
        .any(|w| w.eq_ignore_ascii_case(b"identities"))
}

fn method_label(method: &axum::http::Method) -> &'static str {
    use axum::http::Method;
    match *method {
        Method::GET => "GET",
        Method::POST => "POST",
        Method::DELETE => "DELETE",
        Method::PUT => "PUT",
        Method::PATCH => "PATCH",
        Method::HEAD => "HEAD",
        Method::OPTIONS => "OPTIONS",
        _ => "other",
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn lines_of_the_request_and_of_work_spawned_for_it_show_its_fields() {
        let got = crate::telemetry::json::tests::lines(|| {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .build()
                .unwrap();
            runtime.block_on(async {
                let current = Current {
                    fields: Arc::new(RequestFields {
                        id: "req-7".into(),
                        method: axum::http::Method::POST,
                        path: "/kyc-sessions".into(),
                        trace: None,
                    }),
                    notes: RefCell::default(),
                };
                CURRENT
                    .scope(current, async {
                        tracing::info!("in the request");
                        let spawned = in_current_request(async {
                            tracing::info!("spawned for it");
                            // What it notes is its own.
                            note_flow("access");
                        });
                        tokio::spawn(spawned).await.unwrap();
                        tokio::spawn(async { tracing::info!("spawned apart") })
                            .await
                            .unwrap();
                        assert!(CURRENT.with(|c| c.notes.borrow().flow.is_none()));
                    })
                    .await;
            });
        });
        let request = json!({
            "request_id": "req-7", "method": "POST", "path": "/kyc-sessions", "name": "request"
        });
        assert_eq!(got.len(), 3, "{got:?}");
        assert_eq!(got[0]["span"], request, "{}", got[0]);
        assert_eq!(got[1]["message"], "spawned for it");
        assert_eq!(got[1]["span"], request, "{}", got[1]);
        assert_eq!(got[2]["message"], "spawned apart");
        assert!(got[2].get("span").is_none(), "{}", got[2]);
    }

    #[test]
    fn safe_ids_are_kept_and_others_refused() {
        assert!(is_acceptable("gw-1234:abc/def_ghi.jkl"));
        assert!(is_acceptable(&"a".repeat(255)));
        assert!(!is_acceptable(&"a".repeat(256)));
        assert!(!is_acceptable(""));
        assert!(!is_acceptable("has space"));
        assert!(!is_acceptable("crlf\r\nx"));
        assert!(!is_acceptable("ümlaut"));
    }

    #[test]
    fn paths_naming_the_identities_are_found_in_any_case_and_escape() {
        for path in [
            "//identities/ref",
            "/Identities/ref",
            "/identities%2Fref",
            "/%69DENTITIES/ref",
        ] {
            assert!(names_identities(path), "{path}");
        }
        for path in ["/kyc-sessions", "/identitie", "/%6", "/%zz/identitie", "/"] {
            assert!(!names_identities(path), "{path}");
        }
    }
}
