//! Fault injection: rules that delay, fail or drop matching finAPI calls.

use std::sync::Mutex;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::Endpoint;

/// `endpoint` value of a rule that matches every simulated finAPI endpoint.
pub const ANY_ENDPOINT: &str = "*";
/// Longest latency a rule may add (one hour).
pub const MAX_LATENCY_MS: u64 = 3_600_000;
/// Most rules `POST /__sim/faults` lets be active at once.
pub const MAX_RULES: usize = 1_000;
/// Largest padding a rule may add to a body (1 GiB): enough to outgrow any client's cap.
pub const MAX_PAD_BYTES: u64 = 1 << 30;

/// One fault rule, as accepted by `POST /__sim/faults` and [`super::SimHandle::add_fault`].
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct FaultRule {
    /// A stats key such as `"POST /api/v2/users"`; `"POST /api/v2/oauth/token"` matches every
    /// grant, `"POST /api/v2/oauth/token client_credentials"` one grant; `"*"` matches all.
    pub endpoint: String,
    /// Delay added before the request is handled.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub latency_ms: Option<u64>,
    /// Answer this status (400..=599) instead of handling the request.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<u16>,
    /// Seconds sent as `Retry-After` together with `status`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_after: Option<u64>,
    /// Close the connection without any response, without handling the request.
    #[serde(default)]
    pub drop_connection: bool,
    /// Handle the request for real, then close the connection without a response.
    #[serde(default)]
    pub drop_after_handling: bool,
    /// Share of matching calls affected, 0..=1; all of them when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub probability: Option<f64>,
    /// Affect only the next N matching calls, then the rule is removed. In a listing this is
    /// the number of calls left.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub count: Option<u64>,
    /// Top-level fields written over the JSON object the call answers (after real handling or
    /// `status`), e.g. `{"expires_in": 9223372036854775807}` or `{"access_token": "a\nb"}`:
    /// answers finAPI's contract does not allow, to test their readers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub set: Option<Map<String, Value>>,
    /// Bytes of JSON white space appended to the answer's body (at most [`MAX_PAD_BYTES`]); the
    /// body stays valid JSON, only very large. Streamed, so the simulator holds none of it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pad_bytes: Option<u64>,
    /// With `stallMs`: the body is sent up to this byte, then stalls.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stall_after_bytes: Option<u64>,
    /// How long the body stalls at `stallAfterBytes` (at most one hour) before the rest follows.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stall_ms: Option<u64>,
    /// The body is sent up to this byte, then the connection breaks: the `Content-Length` still
    /// announces the whole body, so the client sees an answer cut off.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cut_after_bytes: Option<u64>,
}

impl FaultRule {
    /// Checks the rule as the admin API does; the message names the offending field.
    pub fn validate(&self) -> Result<(), String> {
        if self.endpoint != ANY_ENDPOINT
            && self.endpoint != Endpoint::TOKEN_ANY_GRANT
            && !Endpoint::ALL_KEYS.contains(&self.endpoint.as_str())
        {
            return Err(format!(
                "endpoint must be \"*\", \"{}\" or one of {:?}",
                Endpoint::TOKEN_ANY_GRANT,
                Endpoint::ALL_KEYS
            ));
        }
        if let Some(status) = self.status
            && !(400..=599).contains(&status)
        {
            return Err("status must be within 400..=599".to_owned());
        }
        if self.retry_after.is_some() && self.status.is_none() {
            return Err("retryAfter needs status".to_owned());
        }
        let outcomes = [
            self.status.is_some(),
            self.drop_connection,
            self.drop_after_handling,
        ];
        if outcomes.into_iter().filter(|set| *set).count() > 1 {
            return Err(
                "status, dropConnection and dropAfterHandling exclude each other".to_owned(),
            );
        }
        let body = self.body_fault();
        if body.is_some() && (self.drop_connection || self.drop_after_handling) {
            return Err(
                "set, padBytes, stallAfterBytes and cutAfterBytes need an answer: not with \
                 dropConnection or dropAfterHandling"
                    .to_owned(),
            );
        }
        if self.stall_after_bytes.is_some() != self.stall_ms.is_some() {
            return Err("stallAfterBytes and stallMs go together".to_owned());
        }
        if self.stall_ms.is_some_and(|ms| ms > MAX_LATENCY_MS) {
            return Err(format!("stallMs must be at most {MAX_LATENCY_MS}"));
        }
        if self.pad_bytes.is_some_and(|bytes| bytes > MAX_PAD_BYTES) {
            return Err(format!("padBytes must be at most {MAX_PAD_BYTES}"));
        }
        if self.latency_ms.is_none() && !outcomes.contains(&true) && body.is_none() {
            return Err(
                "a rule needs latencyMs, status, dropConnection, dropAfterHandling, \
                 set, padBytes, stallAfterBytes or cutAfterBytes"
                    .to_owned(),
            );
        }
        if let Some(probability) = self.probability
            && !(0.0..=1.0).contains(&probability)
        {
            return Err("probability must be within 0..=1".to_owned());
        }
        if self.count == Some(0) {
            return Err("count must be at least 1".to_owned());
        }
        if self.latency_ms.is_some_and(|ms| ms > MAX_LATENCY_MS) {
            return Err(format!("latencyMs must be at most {MAX_LATENCY_MS}"));
        }
        Ok(())
    }

    /// What the rule does to the answer's body, if anything.
    fn body_fault(&self) -> Option<BodyFault> {
        let fault = BodyFault {
            set: self.set.clone(),
            pad_bytes: self.pad_bytes.unwrap_or(0),
            stall: self
                .stall_after_bytes
                .zip(self.stall_ms)
                .map(|(at, ms)| (at, Duration::from_millis(ms))),
            cut_after_bytes: self.cut_after_bytes,
        };
        (fault != BodyFault::default()).then_some(fault)
    }

    fn matches(&self, endpoint: Endpoint) -> bool {
        self.endpoint == ANY_ENDPOINT
            || self.endpoint == endpoint.key()
            || (self.endpoint == Endpoint::TOKEN_ANY_GRANT
                && matches!(endpoint, Endpoint::Token(_)))
    }

    fn fires(&self) -> bool {
        match self.probability {
            None => true,
            Some(p) if p >= 1.0 => true,
            Some(p) if p <= 0.0 => false,
            // A failing random source affects nobody rather than everybody.
            Some(p) => getrandom::u64().is_ok_and(|r| (r >> 11) as f64 / (1u64 << 53) as f64 <= p),
        }
    }
}

/// What the faults decided for one request.
#[derive(Debug, Default, PartialEq)]
pub(crate) struct FaultPlan {
    pub latency: Duration,
    pub action: FaultAction,
    /// What happens to the answer's body; from the first firing rule that has a body fault.
    pub body: Option<BodyFault>,
}

/// Changes to an answer's body (see the fields of [`FaultRule`] of the same names).
#[derive(Clone, Debug, Default, PartialEq)]
pub(crate) struct BodyFault {
    pub set: Option<Map<String, Value>>,
    pub pad_bytes: u64,
    /// Stall after this many bytes, for this long.
    pub stall: Option<(u64, Duration)>,
    pub cut_after_bytes: Option<u64>,
}

#[derive(Debug, Default, PartialEq)]
pub(crate) enum FaultAction {
    #[default]
    Handle,
    Answer {
        status: u16,
        retry_after: Option<u64>,
    },
    Drop,
    HandleThenDrop,
}

/// The active rules, in the order they were added.
#[derive(Default)]
pub(crate) struct Faults {
    rules: Mutex<Vec<FaultRule>>,
}

impl Faults {
    pub(crate) fn new(rules: Vec<FaultRule>) -> Self {
        Self {
            rules: Mutex::new(rules),
        }
    }

    pub(crate) fn add(&self, rule: FaultRule) {
        self.lock().push(rule);
    }

    /// Adds a rule from `POST /__sim/faults`, unless `MAX_RULES` are active.
    pub(crate) fn add_bounded(&self, rule: FaultRule) -> Result<(), String> {
        let mut rules = self.lock();
        if rules.len() >= MAX_RULES {
            return Err(format!("at most {MAX_RULES} fault rules can be active"));
        }
        rules.push(rule);
        Ok(())
    }

    pub(crate) fn clear(&self) {
        self.lock().clear();
    }

    pub(crate) fn list(&self) -> Vec<FaultRule> {
        self.lock().clone()
    }

    /// Every matching rule that fires adds its latency; the first one with an outcome decides
    /// it. A firing rule uses up one of its `count`.
    pub(crate) fn plan(&self, endpoint: Endpoint) -> FaultPlan {
        let mut rules = self.lock();
        let mut plan = FaultPlan::default();
        if rules.is_empty() {
            return plan;
        }
        rules.retain_mut(|rule| {
            if !rule.matches(endpoint) || !rule.fires() {
                return true;
            }
            plan.latency = plan
                .latency
                .saturating_add(Duration::from_millis(rule.latency_ms.unwrap_or(0)));
            if plan.action == FaultAction::Handle {
                plan.action = if let Some(status) = rule.status {
                    FaultAction::Answer {
                        status,
                        retry_after: rule.retry_after,
                    }
                } else if rule.drop_connection {
                    FaultAction::Drop
                } else if rule.drop_after_handling {
                    FaultAction::HandleThenDrop
                } else {
                    FaultAction::Handle
                };
            }
            if plan.body.is_none() {
                plan.body = rule.body_fault();
            }
            match &mut rule.count {
                Some(left) => {
                    *left = left.saturating_sub(1);
                    *left > 0
                }
                None => true,
            }
        });
        plan
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<FaultRule>> {
        self.rules
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sim::Grant;

    fn rule(endpoint: &str) -> FaultRule {
        FaultRule {
            endpoint: endpoint.to_owned(),
            status: Some(503),
            ..FaultRule::default()
        }
    }

    #[test]
    fn token_rule_without_grant_matches_every_grant() {
        let faults = Faults::new(vec![rule(Endpoint::TOKEN_ANY_GRANT)]);
        for grant in [None, Some(Grant::Password), Some(Grant::ClientCredentials)] {
            assert_ne!(
                faults.plan(Endpoint::Token(grant)).action,
                FaultAction::Handle
            );
        }
        assert_eq!(faults.plan(Endpoint::GetUser).action, FaultAction::Handle);
    }

    #[test]
    fn counted_rule_is_removed_when_spent() {
        let faults = Faults::new(vec![FaultRule {
            count: Some(2),
            ..rule("*")
        }]);
        faults.plan(Endpoint::GetUser);
        assert_eq!(faults.list()[0].count, Some(1));
        faults.plan(Endpoint::DeleteUser);
        assert!(faults.list().is_empty());
    }

    #[test]
    fn latencies_are_bounded_and_never_overflow() {
        let slow = |ms| FaultRule {
            endpoint: ANY_ENDPOINT.into(),
            latency_ms: Some(ms),
            ..FaultRule::default()
        };
        assert!(slow(MAX_LATENCY_MS).validate().is_ok());
        assert!(slow(MAX_LATENCY_MS + 1).validate().is_err());
        // Rules added by the embedding code are not validated: their sum saturates.
        let faults = Faults::new(vec![slow(u64::MAX); 1_001]);
        assert_eq!(faults.plan(Endpoint::DeleteUser).latency, Duration::MAX);
        let bounded = Faults::new(Vec::new());
        for _ in 0..MAX_RULES {
            bounded.add_bounded(slow(1)).unwrap();
        }
        assert!(bounded.add_bounded(slow(1)).is_err());
    }

    #[test]
    fn validation_rejects_nonsense() {
        assert!(rule("*").validate().is_ok());
        assert!(rule("GET /nowhere").validate().is_err());
        assert!(
            FaultRule {
                status: Some(200),
                ..rule("*")
            }
            .validate()
            .is_err()
        );
        assert!(
            FaultRule {
                probability: Some(1.5),
                ..rule("*")
            }
            .validate()
            .is_err()
        );
        assert!(
            FaultRule {
                drop_connection: true,
                ..rule("*")
            }
            .validate()
            .is_err()
        );
        assert!(
            FaultRule {
                status: None,
                ..rule("*")
            }
            .validate()
            .is_err()
        );
    }
}
