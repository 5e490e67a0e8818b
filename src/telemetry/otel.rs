//! Distributed tracing: W3C trace context in (`traceparent`, `tracestate`), spans out over
//! OTLP/HTTP protobuf to a collector.
//!
//! The spans are made with OpenTelemetry's SDK directly ([`Span`]), not through `tracing`: the
//! log lines never show them (a request's lines keep naming the logging span `request`), and no
//! log field reaches the collector. Without an endpoint no tracer is installed: every span
//! constructor returns [`Span::none`] after a check of a static.
//!
//! Finished spans wait in a bounded queue, drained by one thread of its own that sends them in
//! batches: a slow or absent collector fills the queue, and further spans are dropped and
//! counted in `broker_trace_spans_dropped_total`; no request ever waits for the collector.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::time::Duration;

use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::{
    Span as _, SpanBuilder, SpanId, SpanKind, Status, TraceContextExt, TraceId, Tracer as _,
    TracerProvider as _,
};
use opentelemetry::{Context, KeyValue};
use opentelemetry_otlp::{WithExportConfig, WithHttpConfig};
use opentelemetry_sdk::error::{OTelSdkError, OTelSdkResult};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{
    Sampler, SdkTracer, SdkTracerProvider, SpanData, SpanExporter, SpanProcessor,
};
use tokio::sync::{Notify, mpsc, oneshot};

use crate::config::{TraceSampler, TracingSettings};

/// Spans sent to the collector in one request, at most.
const MAX_BATCH: usize = 512;
/// How long the exporter waits for more spans to fill a batch after the first one. Every batch
/// costs an HTTP request besides its spans' conversion: with 200 ms, a slow broker (under
/// callgrind) sent 104 batches per 1,000 sessions and spent 8,100 instructions per session in
/// the export outside the conversion, against 2,900 with 25 batches (docs/BENCHMARKS.md,
/// "Issue 14: tracing's cost, third pass"). A busy broker fills a batch (`MAX_BATCH`) sooner
/// and sends it at once. OpenTelemetry's batch processor waits 5 s (`OTEL_BSP_SCHEDULE_DELAY`);
/// a second keeps traces prompt.
const LINGER: Duration = Duration::from_secs(1);
/// How long a shutdown waits for the queue to be sent.
const SHUTDOWN_WAIT: Duration = Duration::from_secs(5);

static ENABLED: AtomicBool = AtomicBool::new(false);

/// Whether spans are exported (a tracer was installed with an endpoint).
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
    Ok(Some((tracer, OtelGuard { provider })))
}

/// Makes `tracer` (from [`tracer`]) the one every [`Span`] of the process is made with.
/// Only the first call takes effect.
pub fn activate(tracer: SdkTracer) {
    if TRACER.set(tracer).is_err() {
        return;
    }
    for reason in ["queue_full", "export_failed"] {
        metrics::counter!(crate::telemetry::metrics::TRACE_SPANS_DROPPED, "reason" => reason)
            .increment(0);
    }
    ENABLED.store(true, Ordering::Relaxed);
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
        // `recv_many` grows an empty vector by doubling, moving the spans each time.
        if batch.capacity() == 0 {
            batch.reserve_exact(MAX_BATCH);
        }
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

/// A span exported to OpenTelemetry, made with the SDK's tracer directly (not through a
/// `tracing` layer), or nothing when export is off. It ends when dropped.
///
/// Through the `tracing` bridge, about a third of what tracing added per session was the
/// bridge's own work: a registry entry, a `SpanBuilder` kept in the span's extensions, filters,
/// and a clock read on every exit of an entered span (docs/BENCHMARKS.md, "Issue 14: tracing's
/// cost, third pass"). A span here is made once with its attributes and is never entered: the
/// spans made while a future runs find their parent in a task-local (see [`Span::scope`]).
pub struct Span(Option<opentelemetry_sdk::trace::Span>);

tokio::task_local! {
    /// The span that spans made by this task are children of.
    static PARENT: Context;
}

static TRACER: OnceLock<SdkTracer> = OnceLock::new();

impl Span {
    /// No span: what every constructor returns when export is off.
    pub const fn none() -> Self {
        Self(None)
    }

    /// A span `name` of `kind`, child of the current task's parent span (see
    /// [`Span::scope`]), or the root of a new trace when there is none.
    pub fn child(name: &'static str, kind: SpanKind, attributes: Vec<KeyValue>) -> Self {
        if !enabled() {
            return Self::none();
        }
        let builder = builder(name, kind, attributes);
        let parent = PARENT.try_with(Context::clone).unwrap_or_default();
        Self::start(|tracer| tracer.build_with_context(builder, &parent))
    }

    /// A span `name` that starts a trace of its own (background work).
    pub fn root(name: &'static str, attributes: Vec<KeyValue>) -> Self {
        if !enabled() {
            return Self::none();
        }
        let builder = builder(name, SpanKind::Internal, attributes);
        Self::start(|tracer| tracer.build_with_context(builder, &Context::new()))
    }

    fn start(build: impl FnOnce(&SdkTracer) -> opentelemetry_sdk::trace::Span) -> Self {
        Self(TRACER.get().map(build))
    }

    /// Whether this is no span at all (export off).
    pub fn is_none(&self) -> bool {
        self.0.is_none()
    }

    /// Sets attribute `key` (an OpenTelemetry semantic convention or a `finapi.*` name).
    pub fn set(&mut self, key: &'static str, value: impl Into<opentelemetry::Value>) {
        if let Some(span) = &mut self.0 {
            span.set_attribute(KeyValue::new(key, value));
        }
    }

    /// Marks the span as failed with `error_type` (OpenTelemetry's `error.type`).
    pub fn fail(&mut self, error_type: &'static str) {
        if let Some(span) = &mut self.0 {
            span.set_attribute(KeyValue::new("error.type", error_type));
            span.set_status(Status::error(""));
        }
    }

    /// The span's context: a parent for other spans, or what [`inject`] sends.
    fn context(&self) -> Option<Context> {
        let span = self.0.as_ref()?;
        Some(Context::new().with_remote_span_context(span.span_context().clone()))
    }

    /// Runs `future` with this span as the parent of the spans it makes (its own task only:
    /// a spawned task takes [`current_parent`] along).
    pub fn scope<F: Future>(&self, future: F) -> impl Future<Output = F::Output> {
        in_parent(self.context(), future)
    }
}

fn builder(name: &'static str, kind: SpanKind, attributes: Vec<KeyValue>) -> SpanBuilder {
    let mut builder = SpanBuilder::from_name(name).with_kind(kind);
    if !attributes.is_empty() {
        builder = builder.with_attributes(attributes);
    }
    builder
}

/// The parent span of the current task, for a task it spawns (see [`in_parent`]).
pub fn current_parent() -> Option<Context> {
    if !enabled() {
        return None;
    }
    PARENT.try_with(Context::clone).ok()
}

/// Runs `future` with `parent` (from [`current_parent`]) as the parent of the spans it makes.
pub async fn in_parent<F: Future>(parent: Option<Context>, future: F) -> F::Output {
    match parent {
        Some(parent) => PARENT.scope(parent, future).await,
        None => future.await,
    }
}

/// The span of one ledger operation `$op` (a string literal): `ledger.$op`, kind client, with
/// `db.operation.name`. Made at the start of the operation and dropped at its end.
macro_rules! ledger_span {
    ($op:literal) => {
        $crate::telemetry::otel::ledger_op_span(concat!("ledger.", $op), $op)
    };
}
pub(crate) use ledger_span;

/// See [`ledger_span!`].
pub fn ledger_op_span(name: &'static str, op: &'static str) -> Span {
    if !enabled() {
        return Span::none();
    }
    Span::child(
        name,
        SpanKind::Client,
        vec![KeyValue::new("db.operation.name", op)],
    )
}

/// The server span of one request (`request`, kind server), or no span when nothing is
/// exported, with the trace id and the span's id for the log lines and problem bodies (their
/// `Display` is W3C's lowercase hex). It continues the caller's trace when `headers` carry a
/// valid `traceparent` (W3C Trace Context). It carries only the HTTP attributes: `method`,
/// `route` (the path template: an identity's path holds a raw client reference), and the
/// status of [`end_server_span`].
pub fn server_span(
    headers: &axum::http::HeaderMap,
    method: &'static str,
    route: &'static str,
) -> (Span, Option<(TraceId, SpanId)>) {
    if !enabled() {
        return (Span::none(), None);
    }
    let parent = TraceContextPropagator::new().extract(&HeaderExtractor(headers));
    let parent = if parent.span().span_context().is_valid() {
        parent
    } else {
        Context::new()
    };
    let builder = builder(
        "request",
        SpanKind::Server,
        vec![
            KeyValue::new("http.request.method", method),
            KeyValue::new("http.route", route),
        ],
    );
    let span = Span::start(|tracer| tracer.build_with_context(builder, &parent));
    let ids = span.0.as_ref().and_then(|span| {
        let sc = span.span_context();
        sc.is_valid().then(|| (sc.trace_id(), sc.span_id()))
    });
    (span, ids)
}

/// Records the answer's status on the server span (OpenTelemetry HTTP semantic conventions:
/// a 5xx is an error of the server).
pub fn end_server_span(span: &mut Span, status: u16) {
    if let Some(span) = &mut span.0 {
        span.set_attribute(KeyValue::new(
            "http.response.status_code",
            i64::from(status),
        ));
        if status >= 500 {
            span.set_status(Status::error(""));
        }
    }
}

/// Adds `traceparent` (and `tracestate`) of `span` to an outgoing request's headers.
pub fn inject(span: &Span, headers: &mut reqwest::header::HeaderMap) {
    if let Some(cx) = span.context() {
        TraceContextPropagator::new().inject_context(&cx, &mut HeaderInjector(headers));
    }
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
