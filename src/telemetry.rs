//! Logging: JSON lines or human-readable text, filtered in `RUST_LOG` syntax.

use std::io::IsTerminal;
use std::sync::atomic::{AtomicBool, Ordering};

pub mod json;
pub mod otel;

use tracing_appender::non_blocking::WorkerGuard;
use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer, Registry};

use crate::config::{LogFormat, TracingSettings};

/// `outer: cause: root cause`, for logging an error once with its whole chain.
pub fn cause_chain(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// Log lines queued for the writer thread at most; a handler that finds the queue full waits.
const LOG_QUEUE_LINES: usize = 8_192;

/// What [`init`] started: dropping it flushes the queued log lines and sends the queued spans.
pub struct Telemetry {
    _logs: Option<WorkerGuard>,
    _spans: Option<otel::OtelGuard>,
}

/// Whether requests run in a `tracing` span named `request`: only for the human-readable
/// format, which shows a request's fields through its span. JSON lines take them from the
/// request's task (`crate::api::request_id::RequestFields`), which costs far less.
static REQUEST_SPANS: AtomicBool = AtomicBool::new(false);

/// Whether requests run in a `tracing` span (see [`REQUEST_SPANS`]).
pub fn request_spans() -> bool {
    REQUEST_SPANS.load(Ordering::Relaxed)
}

/// Installs the global subscriber writing to standard error through a background thread, so
/// that request handlers never block on a slow log pipe, and exporting spans when `tracing`
/// names an endpoint. `RUST_LOG`, when set, overrides `filter`. Keep the returned guard alive
/// until exit.
pub fn init(
    format: LogFormat,
    filter: &str,
    tracing: Option<&TracingSettings>,
) -> Result<Telemetry, otel::OtelError> {
    let (writer, guard) = tracing_appender::non_blocking::NonBlockingBuilder::default()
        // Under a flood the queue is full: wait rather than lose lines.
        .lossy(false)
        // The queue is allocated whole at start (32 bytes a line): the default 128,000 lines
        // held 4 MiB resident for good (issue 15); 8,192 still hold seconds of lines at full load.
        .buffered_lines_limit(LOG_QUEUE_LINES)
        // The writer thread flushes whenever its queue runs empty: a burst of lines is one write.
        .finish(std::io::BufWriter::new(std::io::stderr()));
    let (installed, spans) = install(format, filter, writer, tracing)?;
    Ok(Telemetry {
        _logs: installed.then_some(guard),
        _spans: spans,
    })
}

/// Like [`init`] without span export, with another writer (tests capture logs this way).
/// Returns whether the subscriber was installed (only one per process can be).
pub fn init_with_writer<W>(format: LogFormat, filter: &str, writer: W) -> bool
where
    W: for<'a> MakeWriter<'a> + Send + Sync + 'static,
{
    install(format, filter, writer, None).is_ok_and(|(installed, _)| installed)
}

/// Installs the global subscriber: log lines to `writer`, and spans to the collector of
/// `tracing` when it names one. Returns whether it was installed, and the export's guard.
pub fn install<W>(
    format: LogFormat,
    filter: &str,
    writer: W,
    tracing: Option<&TracingSettings>,
) -> Result<(bool, Option<otel::OtelGuard>), otel::OtelError>
where
    W: for<'a> MakeWriter<'a> + Send + Sync + 'static,
{
    // An empty RUST_LOG parses as a filter that enables nothing: it counts as unset. One
    // that does not parse is refused by the configuration before this runs.
    let filter = std::env::var("RUST_LOG")
        .ok()
        .filter(|f| !f.trim().is_empty())
        .and_then(|f| f.parse::<EnvFilter>().ok())
        .unwrap_or_else(|| EnvFilter::new(filter));
    let json = match format {
        LogFormat::Json => true,
        LogFormat::Pretty => false,
        LogFormat::Auto => !std::io::stderr().is_terminal(),
    };
    let lines = tracing_subscriber::fmt::layer()
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(writer);
    let lines: Box<dyn Layer<Registry> + Send + Sync> = if json {
        lines
            .fmt_fields(json::JsonFields)
            .event_format(json::JsonLine)
            .boxed()
    } else {
        lines.boxed()
    };
    let lines = lines.with_filter(filter);
    let export = tracing.map(otel::tracer).transpose()?.flatten();
    let installed = tracing_subscriber::registry()
        .with(lines)
        .try_init()
        .is_ok();
    if installed {
        REQUEST_SPANS.store(!json, Ordering::Relaxed);
    }
    let guard = match export {
        Some((tracer, guard)) if installed => {
            otel::activate(tracer);
            Some(guard)
        }
        _ => None,
    };
    Ok((installed, guard))
}

/// Prometheus metrics: names, and the one recorder of the process.
pub mod metrics {
    use std::collections::HashMap;
    use std::hash::Hash;
    use std::sync::{Mutex, OnceLock, PoisonError};

    use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

    /// Requests by route, method, status and caller (counter).
    pub const HTTP_REQUESTS: &str = "broker_http_requests_total";
    /// Request latency by route, method, status and caller (histogram, seconds).
    pub const HTTP_DURATION: &str = "broker_http_request_duration_seconds";
    /// Requests being handled (gauge).
    pub const HTTP_IN_FLIGHT: &str = "broker_http_requests_in_flight";
    /// finAPI calls by service, step and outcome (counter).
    pub const FINAPI_CALLS: &str = "broker_finapi_calls_total";
    /// finAPI call latency by service, step and outcome (histogram, seconds).
    pub const FINAPI_DURATION: &str = "broker_finapi_call_duration_seconds";
    /// Client-token cache lookups by result: `hit` or `miss` (counter).
    pub const TOKEN_CACHE: &str = "broker_client_token_cache_lookups_total";
    /// Client-token fetches by trigger (`request`, `refresh`) and outcome (counter).
    pub const TOKEN_FETCHES: &str = "broker_client_token_fetches_total";
    /// KYC sessions by flow and outcome (`created` or the error code) (counter).
    pub const SESSIONS: &str = "broker_kyc_sessions_total";
    /// User deletions by outcome (`deleted` or the error code) (counter).
    pub const DELETIONS: &str = "broker_user_deletions_total";

    /// Upstream calls made again after a transient failure (counter).
    pub const RETRIES: &str = "broker_finapi_retries_total";
    /// Standalone sessions started again from a new process (counter).
    pub const PROCESS_RESTARTS: &str = "broker_process_restarts_total";
    /// Processes possibly left unused at finAPI (counter).
    pub const PROCESSES_ABANDONED: &str = "broker_processes_possibly_abandoned_total";
    /// Users created whose token could not be had (counter).
    pub const ORPHANED_USERS: &str = "broker_orphaned_users_total";
    /// Sessions whose time budget ran out (counter).
    pub const BUDGET_EXHAUSTED: &str = "broker_session_budget_exhausted_total";
    /// Requests that waited for a background client-token refresh (counter).
    pub const TOKEN_WAITS: &str = "broker_client_token_waits_for_refresh_total";
    /// Circuit breaker state by service: 1 open (or probing), 0 closed (gauge).
    pub const CIRCUIT_OPEN: &str = "broker_finapi_circuit_open";
    /// Times a service's circuit breaker opened (counter).
    pub const CIRCUIT_OPENED: &str = "broker_finapi_circuit_opened_total";
    /// Calls a service's circuit breaker refused (counter).
    pub const CIRCUIT_REJECTED: &str = "broker_finapi_circuit_rejected_total";
    /// Gauge: managed identities in the ledger, by `state`.
    pub const IDENTITIES: &str = "broker_identities";
    /// Counter: identity deletions by `outcome` (`deleted`, `unknown`, or the failure's code).
    pub const IDENTITY_DELETIONS: &str = "broker_identity_deletions_total";
    /// Gauge: seconds the oldest overdue deletion is late (0 when none is).
    pub const IDENTITY_OLDEST_OVERDUE: &str = "broker_identity_oldest_overdue_seconds";
    /// Gauge: 1 while the identity ledger answers, 0 while it does not.
    pub const IDENTITY_STORE_UP: &str = "broker_identity_store_up";
    /// Counter: intents written ahead for sessions without a reference, by `outcome`
    /// (`reserved`, `taken`, `discarded`).
    pub const RESERVED_INTENTS: &str = "broker_reserved_intents_total";
    /// Counter: reloads of the secrets and callers (`SIGHUP`), by `outcome` (`ok`, `rejected`).
    pub const CONFIG_RELOADS: &str = "broker_config_reloads_total";
    /// Counter: a finAPI client's secret file read again after finAPI refused the secret, by
    /// `finapi_client` and `outcome` (`changed`, `unchanged`, `failed`).
    pub const SECRET_REREADS: &str = "broker_finapi_secret_rereads_total";
    /// Counter: finished spans not exported, by `reason` (`queue_full`, `export_failed`).
    pub const TRACE_SPANS_DROPPED: &str = "broker_trace_spans_dropped_total";

    /// Counts one identity deletion attempt by its outcome (a fixed set of codes).
    pub fn count_identity_deletion(outcome: &'static str) {
        ::metrics::counter!(IDENTITY_DELETIONS, "outcome" => outcome).increment(1);
    }

    /// Publishes the ledger's state: records per state and the oldest overdue deletion.
    pub fn publish_identities(by_state: &[(&'static str, u64)], oldest_overdue_secs: f64) {
        for (state, count) in by_state {
            ::metrics::gauge!(IDENTITIES, "state" => *state).set(*count as f64);
        }
        ::metrics::gauge!(IDENTITY_OLDEST_OVERDUE).set(oldest_overdue_secs);
    }

    /// Publishes whether the ledger answers.
    pub fn publish_store_up(up: bool) {
        ::metrics::gauge!(IDENTITY_STORE_UP).set(if up { 1.0 } else { 0.0 });
    }

    /// Publishes the flows' resilience counters and breaker states (kept as atomics where
    /// they happen) just before a scrape.
    pub fn publish_resilience(flows: &crate::flows::Flows) {
        let s = flows.stats();
        for (name, value) in [
            (RETRIES, s.retries),
            (PROCESS_RESTARTS, s.process_restarts),
            (PROCESSES_ABANDONED, s.processes_possibly_abandoned),
            (ORPHANED_USERS, s.orphaned_users),
            (BUDGET_EXHAUSTED, s.budget_exhausted),
            (TOKEN_WAITS, s.client_token_waits_for_refresh),
        ] {
            ::metrics::counter!(name).absolute(value);
        }
        let r = flows.reserved_intent_counts();
        for (outcome, value) in [
            ("reserved", r.reserved),
            ("taken", r.taken),
            ("discarded", r.discarded),
        ] {
            ::metrics::counter!(RESERVED_INTENTS, "outcome" => outcome).absolute(value);
        }
        for (client, service, opened, rejected) in flows.circuit_counts() {
            let client = client.to_string();
            ::metrics::counter!(CIRCUIT_OPENED, "service" => service, "finapi_client" => client.clone())
                .absolute(opened);
            ::metrics::counter!(CIRCUIT_REJECTED, "service" => service, "finapi_client" => client)
                .absolute(rejected);
        }
        for (client, service, open) in flows.circuits_open() {
            ::metrics::gauge!(CIRCUIT_OPEN, "service" => service, "finapi_client" => client.to_string())
                .set(if open { 1.0 } else { 0.0 });
        }
    }

    /// An HTTP status as a label value, without allocating on every request.
    pub fn status_label(status: u16) -> &'static str {
        static LABELS: OnceLock<Vec<String>> = OnceLock::new();
        let labels = LABELS.get_or_init(|| (100..600).map(|code: u16| code.to_string()).collect());
        status
            .checked_sub(100)
            .and_then(|i| labels.get(usize::from(i)))
            .map_or("other", String::as_str)
    }

    /// Metric handles by label set, so that a hot path looks its metrics up in a small map of
    /// its own instead of building a key and searching the recorder's registry every time.
    /// Handles are only kept once the Prometheus recorder is installed (before that, the
    /// macros hand out no-op handles, which must not be kept). Label sets must be bounded.
    pub struct HandleCache<K, H> {
        map: Mutex<Option<HashMap<K, H, LabelHasher>>>,
    }

    /// The hash of a [`HandleCache`]'s keys: foldhash's fast hasher with a fixed seed. The keys
    /// are bounded label sets the broker itself chooses (routes, statuses, configured caller and
    /// client names), never a caller's input, so no key flood can arise and the std map's
    /// SipHash (about 400 instructions a lookup, 6 lookups a session) buys nothing
    /// (docs/BENCHMARKS.md, "Issue 15: where the targets stand").
    type LabelHasher = foldhash::fast::FixedState;

    impl<K: Hash + Eq, H> HandleCache<K, H> {
        /// An empty cache (usable in a `static`).
        pub const fn new() -> Self {
            Self {
                map: Mutex::new(None),
            }
        }

        /// Runs `use_it` on the handles for `key`, made by `make` the first time.
        pub fn with<R>(
            &self,
            key: K,
            make: impl FnOnce(&K) -> H,
            use_it: impl FnOnce(&H) -> R,
        ) -> R {
            if HANDLE.get().is_none_or(Option::is_none) {
                return use_it(&make(&key));
            }
            let mut map = self.map.lock().unwrap_or_else(PoisonError::into_inner);
            let handles = map
                .get_or_insert_with(HashMap::default)
                .entry(key)
                .or_insert_with_key(make);
            use_it(handles)
        }
    }

    impl<K: Hash + Eq, H> Default for HandleCache<K, H> {
        fn default() -> Self {
            Self::new()
        }
    }

    static HANDLE: OnceLock<Option<PrometheusHandle>> = OnceLock::new();
    /// How often queued histogram samples are folded into their buckets.
    const UPKEEP_INTERVAL: std::time::Duration = std::time::Duration::from_secs(1);

    /// The process's Prometheus recorder, installed on first use. `None` if another recorder
    /// was installed first.
    pub fn handle() -> Option<&'static PrometheusHandle> {
        HANDLE.get_or_init(install).as_ref()
    }

    fn install() -> Option<PrometheusHandle> {
        let buckets = [
            0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
        ];
        let handle = PrometheusBuilder::new()
            .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), &buckets)
            .ok()?
            .install_recorder()
            .ok()?;
        describe();
        // Histogram samples queue up until drained; without a scrape they would grow without
        // bound, so drain them on a timer too.
        let upkeep = handle.clone();
        let _ = std::thread::Builder::new()
            .name("metrics-upkeep".into())
            .spawn(move || {
                loop {
                    std::thread::sleep(UPKEEP_INTERVAL);
                    upkeep.run_upkeep();
                }
            });
        Some(handle)
    }

    fn describe() {
        use ::metrics::{Unit, describe_counter, describe_gauge, describe_histogram};
        describe_counter!(
            HTTP_REQUESTS,
            "Requests by route, method, status and caller"
        );
        describe_histogram!(HTTP_DURATION, Unit::Seconds, "Request latency");
        describe_gauge!(HTTP_IN_FLIGHT, "Requests being handled");
        describe_counter!(FINAPI_CALLS, "finAPI calls by service, step and outcome");
        describe_histogram!(FINAPI_DURATION, Unit::Seconds, "finAPI call latency");
        describe_counter!(TOKEN_CACHE, "Client-token cache lookups by result");
        describe_counter!(TOKEN_FETCHES, "Client-token fetches by trigger and outcome");
        describe_counter!(SESSIONS, "KYC sessions by flow and outcome");
        describe_counter!(DELETIONS, "User deletions by outcome");
        describe_counter!(RETRIES, "finAPI calls made again after a transient failure");
        describe_counter!(
            PROCESS_RESTARTS,
            "Standalone sessions restarted from a new process"
        );
        describe_counter!(
            PROCESSES_ABANDONED,
            "Processes possibly left unused at finAPI"
        );
        describe_counter!(ORPHANED_USERS, "Users created whose token could not be had");
        describe_counter!(BUDGET_EXHAUSTED, "Sessions whose time budget ran out");
        describe_counter!(
            TOKEN_WAITS,
            "Requests that waited for a client-token refresh"
        );
        describe_gauge!(
            CIRCUIT_OPEN,
            "Circuit breaker by service: 1 open or probing, 0 closed"
        );
        describe_counter!(CIRCUIT_OPENED, "Times a service's circuit breaker opened");
        describe_gauge!(
            IDENTITIES,
            "Managed finAPI identities in the ledger by state"
        );
        describe_counter!(IDENTITY_DELETIONS, "Identity deletion attempts by outcome");
        describe_counter!(
            RESERVED_INTENTS,
            "Intents written ahead for sessions without a reference, by outcome"
        );
        describe_gauge!(
            IDENTITY_OLDEST_OVERDUE,
            Unit::Seconds,
            "How late the oldest overdue identity deletion is"
        );
        describe_gauge!(
            IDENTITY_STORE_UP,
            "Whether the identity ledger answers (1) or not (0)"
        );
        describe_counter!(
            TRACE_SPANS_DROPPED,
            "Finished spans not exported: queue full or export failed"
        );
        describe_counter!(
            CONFIG_RELOADS,
            "Reloads of secrets and callers (SIGHUP) by outcome"
        );
        describe_counter!(
            SECRET_REREADS,
            "Client secret files read again after finAPI refused the secret"
        );
        describe_counter!(
            CIRCUIT_REJECTED,
            "Calls a service's circuit breaker refused"
        );
    }

    #[cfg(test)]
    mod tests {
        use std::hash::BuildHasher;

        use super::*;

        #[test]
        fn label_sets_that_differ_anywhere_hash_apart() {
            let hash = |key: &(&str, &str, Option<&str>)| LabelHasher::default().hash_one(key);
            let key = ("/kyc-sessions", "POST", Some("web-frontend"));
            assert_eq!(
                hash(&key),
                hash(&("/kyc-sessions", "POST", Some("web-frontend")))
            );
            for other in [
                ("/kyc-sessions", "POST", Some("web-frontenD")),
                ("/kyc-sessions", "POST", None),
                ("/kyc-sessions", "GET", Some("web-frontend")),
                ("/kyc-sessionsP", "OST", Some("web-frontend")),
                ("/kyc-session", "sPOST", Some("web-frontend")),
            ] {
                assert_ne!(hash(&key), hash(&other), "{other:?}");
            }
        }
    }
}
