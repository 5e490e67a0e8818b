//! The identity reaper: deletes identities that are due, resolves intents nobody completed, and
//! retries failed deletions for as long as they fail. It runs in every replica; leases in the
//! ledger keep two replicas off one identity, and a replica that dies leaves its leases to
//! expire.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use crate::identities::{IdentityState, StoreError};

use super::identities::{millis, now_millis};
use super::{Flows, RequestContext};

/// Identities claimed at once.
const CLAIM_BATCH: u32 = 32;
/// Batches one round works through at most.
const MAX_BATCHES: usize = 16;
/// How long a claim holds an identity: longer than one deletion (two finAPI calls with their
/// retries), so that no other replica takes it meanwhile; a dead replica's claims expire.
const LEASE: Duration = Duration::from_secs(300);
/// `X-Request-Id` of the reaper's finAPI calls and the request id of its ledger events.
const REAPER_REQUEST_ID: &str = "giroident-broker-reaper";

/// Runs the reaper every `flows`' reaper interval until `stop` turns true. The first round runs
/// at once, so that a restarted broker resolves what its predecessor left.
pub async fn run(flows: Arc<Flows>, mut stop: watch::Receiver<bool>) {
    let replica = uuid::Uuid::new_v4().to_string();
    let interval = flows.identities.reaper_interval;
    loop {
        // Each round is a trace of its own.
        let span = crate::telemetry::otel::Span::root("reaper.round", Vec::new());
        match span.scope(round(&flows, &replica)).await {
            Ok(0) => {}
            Ok(n) => tracing::debug!(identities = n, "reaper round"),
            Err(err) => {
                tracing::warn!(error = %crate::telemetry::cause_chain(&err),
                    "identity reaper: the ledger failed; trying again next round");
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(interval) => {}
            _ = stop.wait_for(|stopped| *stopped) => return,
        }
    }
}

/// One round: claims what is due, works through it, publishes the ledger's state. Returns how
/// many identities it worked on.
pub async fn round(flows: &Flows, replica: &str) -> Result<usize, StoreError> {
    let ids = &flows.identities;
    let store = &ids.store;
    let result = async {
        let now = now_millis();
        let orphan_age = millis(ids.orphan_min_age);
        let ctx = RequestContext {
            request_id: Arc::from(REAPER_REQUEST_ID),
            caller: Arc::from("reaper"),
            // Each deletion goes through its identity's own client (`delete_identity`).
            finapi_client: Arc::from(crate::config::DEFAULT_CLIENT),
            end_user: crate::finapi::EndUserMetadata::default(),
        };
        let mut worked = 0;
        // Batch after batch while a full one comes back, so that a backlog drains within a
        // round; bounded, so that a round ends.
        for _ in 0..MAX_BATCHES {
            let claimed = store
                .claim_due(now, orphan_age, replica, millis(LEASE), CLAIM_BATCH)
                .await?;
            for record in &claimed {
                if record.state == IdentityState::Active {
                    // Due: no session may reuse it any more.
                    store
                        .mark_deleting(record.id, now.saturating_add(millis(LEASE)))
                        .await?;
                }
                flows.delete_identity(record, &ctx).await;
            }
            worked += claimed.len();
            if claimed.len() < CLAIM_BATCH as usize {
                break;
            }
        }
        publish(flows).await?;
        Ok(worked)
    }
    .await;
    crate::telemetry::metrics::publish_store_up(!matches!(result, Err(StoreError::Unavailable(_))));
    result
}

async fn publish(flows: &Flows) -> Result<(), StoreError> {
    let store = &flows.identities.store;
    let counts = store.counts_by_state().await?;
    let by_state: Vec<(&'static str, u64)> = [
        IdentityState::Intent,
        IdentityState::Active,
        IdentityState::Deleting,
        IdentityState::Deleted,
    ]
    .into_iter()
    .map(|state| {
        let count = counts
            .iter()
            .find(|(s, _)| *s == state)
            .map_or(0, |(_, n)| *n);
        (state.as_str(), count)
    })
    .collect();
    let now = now_millis();
    let overdue = store
        .oldest_overdue(now)
        .await?
        .map_or(0.0, |since| (now - since).max(0) as f64 / 1e3);
    crate::telemetry::metrics::publish_identities(&by_state, overdue);
    Ok(())
}
