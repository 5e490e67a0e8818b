//! Distributed tracing: W3C trace context in (`traceparent`, `tracestate`), spans out over
//! OTLP/HTTP protobuf to a collector.
//!
//! Only spans with [`TARGET`] reach OpenTelemetry (the request's server span among them); the
//! log lines never show them (a request's lines keep naming the logging span `request`). Without
//! an endpoint no layer is installed: those spans are disabled at their call sites and cost a
//! check of a static.
//!
//! Finished spans wait in a bounded queue, drained by one thread of its own that sends them in
//! batches: a slow or absent collector fills the queue, and further spans are dropped and
//! counted in `broker_trace_spans_dropped_total`; no request ever waits for the collector.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::{TraceContextExt, TracerProvider as _};
use opentelemetry_otlp::{WithExportConfig, WithHttpConfig};
use opentelemetry_sdk::error::{OTelSdkError, OTelSdkResult};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{Sampler, SdkTracerProvider, SpanData, SpanExporter, SpanProcessor};
use tokio::sync::{Notify, mpsc, oneshot};
use tracing_opentelemetry::OpenTelemetrySpanExt;

use crate::config::{TraceSampler, TracingSettings};

/// The target of spans meant for OpenTelemetry only (finAPI calls, the token cache, the
/// ledger, background work).
pub const TARGET: &str = "giroident_broker::otel";

/// Spans sent to the collector in one request, at most.
const MAX_BATCH: usize = 512;
/// How long the exporter waits for more spans to fill a batch after the first one.
const LINGER: Duration = Duration::from_millis(200);
/// How long a shutdown waits for the queue to be sent.
const SHUTDOWN_WAIT: Duration = Duration::from_secs(5);

static ENABLED: AtomicBool = AtomicBool::new(false);

/// Whether spans are exported (a tracing layer was installed with an endpoint).
pub fn enabled() -> bool {
    ENABLED.load(Ordering::Relaxed)
}

/// The exporter could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum OtelError {
    /// The OTLP exporter refused its configuration.
    #[error("cannot build the OTLP exporter")]
    Exporter(#[from] opentelemetry_otlp::ExporterBuildError),
    /// The HTTP client or the export thread could not be made.
    #[error("cannot start the span export")]
    Start(#[source] std::io::Error),
}

/// Keeps the export running; dropping it sends what is queued (waiting a few seconds at most).
pub struct OtelGuard {
    provider: SdkTracerProvider,
}

impl Drop for OtelGuard {
    fn drop(&mut self) {
        let _ = self.provider.shutdown();
        ENABLED.store(false, Ordering::Relaxed);
    }
}

/// A tracer exporting to the collector `settings` name, or `None` when no endpoint is set.
pub fn tracer(
    settings: &TracingSettings,
) -> Result<Option<(opentelemetry_sdk::trace::SdkTracer, OtelGuard)>, OtelError> {
    let Some(url) = settings.traces_url() else {
        return Ok(None);
    };
    // Checked at load; a bad pair here is skipped rather than failing the start.
    let headers = settings
        .header_pairs()
        .unwrap_or_default()
        .into_iter()
        .collect();
    let timeout = Duration::from_millis(settings.timeout_ms);
    let _ = rustls::crypto::ring::default_provider().install_default();
    let http = reqwest::Client::builder()
        .timeout(timeout)
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .map_err(|err| OtelError::Start(std::io::Error::other(err.without_url())))?;
    let mut exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_http_client(http)
        .with_endpoint(url)
        .with_headers(headers)
        .with_timeout(timeout)
        .build()?;
    let resource = opentelemetry_sdk::Resource::builder_empty()
        .with_service_name(settings.service_name.clone())
        .with_attribute(opentelemetry::KeyValue::new(
            "service.version",
            env!("CARGO_PKG_VERSION"),
        ))
        .build();
    exporter.set_resource(&resource);
    let processor = QueueProcessor::start(exporter, settings.max_queue_size, timeout)?;
    let provider = SdkTracerProvider::builder()
        .with_span_processor(processor)
        .with_sampler(sampler(
            settings
                .sampler()
                .unwrap_or(TraceSampler::ParentBasedAlwaysOn),
        ))
        .with_resource(resource)
        .build();
    let tracer = provider.tracer("giroident-broker");
    for reason in ["queue_full", "export_failed"] {
        metrics::counter!(crate::telemetry::metrics::TRACE_SPANS_DROPPED, "reason" => reason)
            .increment(0);
    }
    ENABLED.store(true, Ordering::Relaxed);
    Ok(Some((tracer, OtelGuard { provider })))
}

fn sampler(choice: TraceSampler) -> Sampler {
    match choice {
        TraceSampler::AlwaysOn => Sampler::AlwaysOn,
        TraceSampler::AlwaysOff => Sampler::AlwaysOff,
        TraceSampler::TraceIdRatio(r) => Sampler::TraceIdRatioBased(r),
        TraceSampler::ParentBasedAlwaysOn => Sampler::ParentBased(Box::new(Sampler::AlwaysOn)),
        TraceSampler::ParentBasedAlwaysOff => Sampler::ParentBased(Box::new(Sampler::AlwaysOff)),
        TraceSampler::ParentBasedTraceIdRatio(r) => {
            Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(r)))
        }
    }
}

fn count_dropped(reason: &'static str, spans: usize) {
    metrics::counter!(crate::telemetry::metrics::TRACE_SPANS_DROPPED, "reason" => reason)
        .increment(spans as u64);
}

/// A batch processor whose queue never blocks and whose drops are counted (the SDK's own
/// batch processor only logs them).
#[derive(Debug)]
struct QueueProcessor {
    queue: mpsc::Sender<SpanData>,
    /// Wakes the export thread early once a full batch waits (see [`drain`]).
    full: Arc<Notify>,
    /// The queue's free places at or below which a batch worth sending at once waits.
    full_at: usize,
    stop: Mutex<Option<(oneshot::Sender<()>, std::sync::mpsc::Receiver<()>)>>,
}

impl QueueProcessor {
    fn start<E: SpanExporter + 'static>(
        exporter: E,
        capacity: usize,
        timeout: Duration,
    ) -> Result<Self, OtelError> {
        let capacity = capacity.max(1);
        let (queue, spans) = mpsc::channel(capacity);
        // A batch, or half the queue when that is smaller, is sent without lingering.
        let wake_at = MAX_BATCH.min((capacity / 2).max(1));
        let full = Arc::new(Notify::new());
        let batch_full = full.clone();
        let (stop, stopped) = oneshot::channel();
        let (done, finished) = std::sync::mpsc::channel();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(OtelError::Start)?;
        // A thread of its own: the export outlives any one runtime (tests run several), and
        // never competes with request handling on the server's workers.
        std::thread::Builder::new()
            .name("otel-export".into())
            .spawn(move || {
                runtime.block_on(drain(
                    exporter,
                    spans,
                    (&batch_full, wake_at),
                    stopped,
                    timeout,
                ));
                let _ = done.send(());
            })
            .map_err(OtelError::Start)?;
        Ok(Self {
            queue,
            full,
            full_at: capacity - wake_at,
            stop: Mutex::new(Some((stop, finished))),
        })
    }
}

impl SpanProcessor for QueueProcessor {
    fn on_start(&self, _span: &mut opentelemetry_sdk::trace::Span, _cx: &opentelemetry::Context) {}

    fn on_end(&self, span: SpanData) {
        if !span.span_context.is_sampled() {
            return;
        }
        if self.queue.try_send(span).is_err() {
            count_dropped("queue_full", 1);
        }
        if self.queue.capacity() <= self.full_at {
            self.full.notify_one();
        }
    }

    /// Spans are sent within [`LINGER`] of their end anyway.
    fn force_flush(&self) -> OTelSdkResult {
        Ok(())
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        let taken = self
            .stop
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        let Some((stop, finished)) = taken else {
            return Err(OTelSdkError::AlreadyShutdown);
        };
        let _ = stop.send(());
        finished
            .recv_timeout(timeout.min(SHUTDOWN_WAIT))
            .map_err(|_| OTelSdkError::Timeout(timeout))
    }
}

/// Sends queued spans in batches until stopped, then sends what is left.
///
/// The first span of a batch wakes the thread; then it sleeps for [`LINGER`] (or until
/// `wake_at` spans wait, or the stop) and takes what has queued meanwhile. Waiting in `recv` for each
/// further span instead would wake this thread once or twice per span, which cost more
/// instructions per session than any other part of the queue (docs/BENCHMARKS.md, "Tracing
/// (issue 14)").
async fn drain<E: SpanExporter>(
    exporter: E,
    mut spans: mpsc::Receiver<SpanData>,
    (full, wake_at): (&Notify, usize),
    mut stop: oneshot::Receiver<()>,
    timeout: Duration,
) {
    let mut batch = Vec::with_capacity(MAX_BATCH);
    loop {
        tokio::select! {
            received = spans.recv_many(&mut batch, MAX_BATCH) => {
                if received == 0 {
                    return;
                }
            }
            _ = &mut stop => break,
        }
        let mut stopped = false;
        if batch.len() + spans.len() < wake_at {
            tokio::select! {
                () = tokio::time::sleep(LINGER) => {}
                () = full.notified() => {}
                _ = &mut stop => stopped = true,
            }
        }
        while batch.len() < MAX_BATCH {
            match spans.try_recv() {
                Ok(span) => batch.push(span),
                Err(_) => break,
            }
        }
        export(&exporter, std::mem::take(&mut batch), timeout).await;
        if stopped {
            break;
        }
    }
    spans.close();
    while spans.recv_many(&mut batch, MAX_BATCH).await > 0 {
        export(&exporter, std::mem::take(&mut batch), timeout).await;
    }
}

async fn export<E: SpanExporter>(exporter: &E, batch: Vec<SpanData>, timeout: Duration) {
    let spans = batch.len();
    // The exporter's HTTP client has the same timeout; this one also bounds a stuck connect.
    match tokio::time::timeout(timeout, exporter.export(batch)).await {
        Ok(Ok(())) => {}
        Ok(Err(_)) | Err(_) => count_dropped("export_failed", spans),
    }
}

/// The span of one ledger operation `$op` (a string literal): `ledger.$op`, kind client, with
/// `db.operation.name`. Made at the start of the operation and dropped at its end, it is never
/// entered: an `#[instrument]`ed future would enter and leave it on each of the many polls of
/// a database call (docs/BENCHMARKS.md, "Tracing (issue 14)"). The ledger opens no spans of its
/// own, so nothing needs it as the current span.
macro_rules! ledger_span {
    ($op:literal) => {
        ::tracing::info_span!(
            target: $crate::telemetry::otel::TARGET,
            concat!("ledger.", $op),
            otel.kind = "client",
            db.operation.name = $op,
        )
    };
}
pub(crate) use ledger_span;

/// The server span of one request (OpenTelemetry's `request`, kind server), or a disabled
/// span when nothing is exported. It carries only the HTTP attributes set by
/// [`continue_trace`] and [`end_server_span`]; the request's log fields stay on the logging
/// span that [`crate::api`]'s request middleware opens inside it.
pub fn server_span() -> tracing::Span {
    if !enabled() {
        return tracing::Span::none();
    }
    tracing::info_span!(target: TARGET, "request", otel.kind = "server")
}

/// Makes `span` (the server span of [`server_span`]) a child of the caller's trace, when `headers` carry a valid
/// `traceparent`. Returns the trace id and the span's id (lowercase hex), once export is on.
/// `route` is the path template (an identity's path holds a raw client reference).
pub fn continue_trace(
    span: &tracing::Span,
    headers: &axum::http::HeaderMap,
    method: &'static str,
    route: &'static str,
) -> Option<(String, String)> {
    if !enabled() {
        return None;
    }
    let parent = TraceContextPropagator::new().extract(&HeaderExtractor(headers));
    if parent.span().span_context().is_valid() {
        let _ = span.set_parent(parent);
    }
    span.set_attribute("http.request.method", method);
    span.set_attribute("http.route", route);
    let cx = span.context();
    let sc = cx.span().span_context().clone();
    sc.is_valid()
        .then(|| (sc.trace_id().to_string(), sc.span_id().to_string()))
}

/// Records the answer's status on the server span (OpenTelemetry HTTP semantic conventions:
/// a 5xx is an error of the server).
pub fn end_server_span(span: &tracing::Span, status: u16) {
    span.set_attribute("http.response.status_code", i64::from(status));
    if status >= 500 {
        span.set_status(opentelemetry::trace::Status::error(""));
    }
}

/// Adds `traceparent` (and `tracestate`) of `span` to an outgoing request's headers.
pub fn inject(span: &tracing::Span, headers: &mut reqwest::header::HeaderMap) {
    let cx = span.context();
    TraceContextPropagator::new().inject_context(&cx, &mut HeaderInjector(headers));
}

struct HeaderExtractor<'a>(&'a axum::http::HeaderMap);

impl Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(|k| k.as_str()).collect()
    }
}

struct HeaderInjector<'a>(&'a mut reqwest::header::HeaderMap);

impl Injector for HeaderInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        if let (Ok(name), Ok(value)) = (
            reqwest::header::HeaderName::from_bytes(key.as_bytes()),
            reqwest::header::HeaderValue::from_str(&value),
        ) {
            self.0.insert(name, value);
        }
    }
}
