//! Per-endpoint response counters and connection counters behind `GET /__sim/stats`.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

/// Counts by endpoint key (`"POST /api/v2/users"`), then by status code (`"201"`) or
/// `"dropped"` for a connection closed without an answer.
pub type Stats = BTreeMap<String, BTreeMap<String, u64>>;

/// What a counted request ended with.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) enum Outcome {
    Status(u16),
    Dropped,
}

/// Counters keyed by static endpoint names, so recording is one short lock and no allocation.
#[derive(Default)]
pub(crate) struct Counters {
    counts: Mutex<HashMap<(&'static str, Outcome), u64>>,
}

impl Counters {
    pub(crate) fn record(&self, endpoint: &'static str, outcome: Outcome) {
        *self
            .counts
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .entry((endpoint, outcome))
            .or_default() += 1;
    }

    pub(crate) fn snapshot(&self) -> Stats {
        let counts = self
            .counts
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone();
        let mut stats = Stats::new();
        for ((endpoint, outcome), count) in counts {
            let outcome = outcome.label();
            stats
                .entry(endpoint.to_owned())
                .or_default()
                .insert(outcome, count);
        }
        stats
    }

    pub(crate) fn reset(&self) {
        self.counts
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clear();
    }
}

/// Request ids whose calls [`CallLog`] keeps at most; the oldest is forgotten first.
pub const CALL_LOG_REQUEST_IDS: usize = 8192;

/// The calls made under each caller-given request id (`X-Request-Id`), in the order they were
/// answered, each as its endpoint key and outcome (as in [`Stats`]: `"201"`, `"dropped"`): for
/// tests that must tell what happened to one request among many.
#[derive(Default)]
pub(crate) struct CallLog {
    calls: Mutex<CallLogEntries>,
}

#[derive(Default)]
struct CallLogEntries {
    by_id: HashMap<String, Vec<(&'static str, Outcome)>>,
    order: VecDeque<String>,
}

impl CallLog {
    pub(crate) fn record(&self, request_id: &str, endpoint: &'static str, outcome: Outcome) {
        let mut log = self
            .calls
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some(calls) = log.by_id.get_mut(request_id) {
            calls.push((endpoint, outcome));
            return;
        }
        if log.order.len() == CALL_LOG_REQUEST_IDS
            && let Some(oldest) = log.order.pop_front()
        {
            log.by_id.remove(&oldest);
        }
        log.order.push_back(request_id.to_owned());
        log.by_id
            .insert(request_id.to_owned(), vec![(endpoint, outcome)]);
    }

    pub(crate) fn calls_of(&self, request_id: &str) -> Vec<(String, String)> {
        let log = self
            .calls
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        log.by_id
            .get(request_id)
            .map(|calls| {
                calls
                    .iter()
                    .map(|(endpoint, outcome)| ((*endpoint).to_owned(), outcome.label()))
                    .collect()
            })
            .unwrap_or_default()
    }

    pub(crate) fn reset(&self) {
        *self
            .calls
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = CallLogEntries::default();
    }
}

impl Outcome {
    /// As [`Stats`] names it: the status code, or `dropped`.
    fn label(self) -> String {
        match self {
            Self::Status(code) => code.to_string(),
            Self::Dropped => "dropped".to_owned(),
        }
    }
}

/// What the simulator's HTTPS listener saw since start or the last reset: the `connections`
/// entry of `GET /__sim/stats` (only when serving HTTPS), for counting how many connections and
/// TLS handshakes a client needs per call.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ConnectionStats {
    /// TCP connections accepted, whether or not their handshake succeeded.
    pub accepted: u64,
    /// TLS handshakes completed, full or resumed (rustls' default session cache).
    pub tls_handshakes: u64,
    /// Of those, the ones whose client chose HTTP/2 by ALPN (RFC 7301, RFC 9113 section 3.2).
    pub h2: u64,
}

impl ConnectionStats {
    /// As an entry of [`Stats`]: `{"accepted":N,"tlsHandshakes":N,"h2":N}`.
    pub(crate) fn as_counts(&self) -> BTreeMap<String, u64> {
        BTreeMap::from([
            ("accepted".to_owned(), self.accepted),
            ("tlsHandshakes".to_owned(), self.tls_handshakes),
            ("h2".to_owned(), self.h2),
        ])
    }
}

/// Lock-free counters behind [`ConnectionStats`], bumped once per connection.
#[derive(Default)]
pub(crate) struct ConnectionCounters {
    accepted: AtomicU64,
    tls_handshakes: AtomicU64,
    h2: AtomicU64,
}

impl ConnectionCounters {
    pub(crate) fn accepted(&self) {
        self.accepted.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn handshake(&self, h2: bool) {
        self.tls_handshakes.fetch_add(1, Ordering::Relaxed);
        if h2 {
            self.h2.fetch_add(1, Ordering::Relaxed);
        }
    }

    pub(crate) fn snapshot(&self) -> ConnectionStats {
        ConnectionStats {
            accepted: self.accepted.load(Ordering::Relaxed),
            tls_handshakes: self.tls_handshakes.load(Ordering::Relaxed),
            h2: self.h2.load(Ordering::Relaxed),
        }
    }

    pub(crate) fn reset(&self) {
        self.accepted.store(0, Ordering::Relaxed);
        self.tls_handshakes.store(0, Ordering::Relaxed);
        self.h2.store(0, Ordering::Relaxed);
    }
}

/// Calls remembered per endpoint by [`PsuLog`]; older ones are forgotten.
pub const PSU_LOG_PER_ENDPOINT: usize = 64;
/// Longest header value kept by [`PsuLog`]; longer values are cut.
const PSU_VALUE_MAX: usize = 1024;

/// The end-user metadata headers of the last calls, by endpoint key (as in [`Stats`]), oldest
/// first: what `GET /__sim/psu` shows.
pub type PsuHeaders = BTreeMap<String, Vec<PsuRecord>>;

/// The `PSU-*` headers one call carried (finAPI reference, "End-user metadata headers"), as
/// received; `None` for a header that was absent.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PsuRecord {
    /// The call's `X-Request-Id` (or the `selfgen-` one made up for it).
    pub request_id: String,
    /// `PSU-IP-Address`.
    pub ip_address: Option<String>,
    /// `PSU-Device-OS`.
    pub device_os: Option<String>,
    /// `PSU-User-Agent`.
    pub user_agent: Option<String>,
    /// `traceparent` (W3C Trace Context), which finAPI ignores; recorded so that tests see
    /// whether a trace id left the broker. Left out of the JSON when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub traceparent: Option<String>,
}

impl PsuRecord {
    pub(crate) fn from_headers(headers: &axum::http::HeaderMap, request_id: &str) -> Self {
        let value = |name: &str| {
            headers.get(name).map(|value| {
                let mut text = String::from_utf8_lossy(value.as_bytes()).into_owned();
                if text.len() > PSU_VALUE_MAX {
                    let mut cut = PSU_VALUE_MAX;
                    while !text.is_char_boundary(cut) {
                        cut -= 1;
                    }
                    text.truncate(cut);
                }
                text
            })
        };
        Self {
            request_id: request_id.to_owned(),
            ip_address: value("psu-ip-address"),
            device_os: value("psu-device-os"),
            user_agent: value("psu-user-agent"),
            traceparent: value("traceparent"),
        }
    }
}

/// The last [`PSU_LOG_PER_ENDPOINT`] calls' `PSU-*` headers per endpoint, bounded.
#[derive(Default)]
pub(crate) struct PsuLog {
    calls: Mutex<HashMap<&'static str, std::collections::VecDeque<PsuRecord>>>,
}

impl PsuLog {
    pub(crate) fn record(&self, endpoint: &'static str, record: PsuRecord) {
        let mut calls = self
            .calls
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let recent = calls.entry(endpoint).or_default();
        if recent.len() >= PSU_LOG_PER_ENDPOINT {
            recent.pop_front();
        }
        recent.push_back(record);
    }

    pub(crate) fn snapshot(&self) -> PsuHeaders {
        self.calls
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .iter()
            .map(|(endpoint, recent)| ((*endpoint).to_owned(), recent.iter().cloned().collect()))
            .collect()
    }

    pub(crate) fn reset(&self) {
        self.calls
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clear();
    }
}
