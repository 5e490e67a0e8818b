//! Per-endpoint response counters behind `GET /__sim/stats`.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;

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
            let outcome = match outcome {
                Outcome::Status(code) => code.to_string(),
                Outcome::Dropped => "dropped".to_owned(),
            };
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
