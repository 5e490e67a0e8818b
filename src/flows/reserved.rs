//! Reserved intents: intent records written ahead of time, many in one group commit, so that an
//! access session without a `clientReference` takes one that is already durable and goes
//! straight to `POST /api/v2/users`. Its only ledger write on the way is then the activation,
//! one group commit instead of two (issue 12).
//!
//! Why each rule holds (README "Managed identities" and "Durability" say it for operators):
//!
//! - **Durable before finAPI hears of the user.** An entry enters the pool only once the writer
//!   answered its intent, i.e. after its commit, as durable as any intent under the configured
//!   `sqlite_synchronous` (synced under `full` and `intents`). The rule of issue 12 asks that
//!   the intent be durable, not that the session write it.
//! - **Only without a reference.** An intent with a reference carries its digest, and the
//!   ledger's unique index on it is what makes concurrent first sessions for one reference
//!   create one user; it is written by its session, as before.
//! - **Everything an intent row carries.** One pool per (caller, finAPI client), made when
//!   first needed; each entry names the newest password key at its reservation, and one whose
//!   key is no longer the newest (a reload rotated it) is not used; `created_at` is the
//!   reservation time, `delete_after` that plus `orphan_min_age`, as for any intent.
//! - **Out of the reaper's way.** The reaper resolves an intent once older than
//!   `orphan_min_age` (O). A session ends within `server.request_timeout_secs` (T < O, checked
//!   by the config), so an intent written at a session's start leaves a margin of O − T
//!   between the session's end (and any `POST` of it finAPI may still carry out) and the
//!   reaper. An entry is used only while younger than [`max_age`] = (O − T) / 2: its session
//!   then ends by `created_at` + (O − T) / 2 + T, and half of the old margin is kept for the
//!   late `POST`. Older entries are discarded.
//! - **Unused entries leave no trace.** Discarded entries, and all of them at graceful
//!   shutdown, are deleted from the ledger by the broker itself
//!   ([`IdentityStore::delete_unused_intents`]): it knows it never sent their `POST`, so no
//!   finAPI call is needed. A sweep every `max_age / 2` discards the expired ones, so that they
//!   are gone long before the reaper's orphan age. After a crash (SIGKILL, power loss) the
//!   entries in memory stay intents: the next reaper resolves each as an orphan (finAPI does
//!   not know the user: closed as never created), correct, at the cost of two failed password
//!   grants each (`UNKNOWN_CONFIRMATIONS`), at most `identities.reserved_intents` per (caller, finAPI client).
//! - **Adaptive, no waste at low traffic.** A session that finds the pool empty writes its own
//!   intent as before. It asks for a refill only when the pool's previous session came less
//!   than `max_age` before (an entry reserved now would likely be taken in time), so a quiet
//!   broker reserves nothing. A refill that follows such misses is twice the size of the one
//!   before, up to `identities.reserved_intents`; a sweep that discards expired entries halves
//!   it. While a refill is in flight no second one starts for the pool; a pool below half its
//!   refill size is topped up ahead of the next miss.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::watch;
use uuid::Uuid;

use crate::identities::{IdentityStore, Millis, NewIdentity};

use super::access::generate_user_id;
use super::identities::{millis, now_millis};
use super::{Flows, RequestContext};

/// An intent written ahead of time: what a session needs of it.
#[derive(Debug)]
pub(super) struct Reserved {
    /// The ledger's identity id.
    pub id: Uuid,
    /// The finAPI user id the session creates.
    pub finapi_user_id: String,
    /// The password key id its record names.
    pub key_id: String,
    /// Its reservation (and the record's `created_at`), Unix ms.
    pub created_at: Millis,
}

/// The entries of one (caller, finAPI client).
#[derive(Debug, Default)]
struct Pool {
    /// Ready entries, the oldest first.
    ready: VecDeque<Reserved>,
    /// The size of the next refill (0 until the first miss).
    batch: usize,
    /// A refill is in flight.
    refilling: bool,
    /// A session found the pool empty since the last refill began: the next one is larger.
    short: bool,
    /// The last session that looked here, Unix ms (0: none yet).
    last_demand: Millis,
}

/// A refill to start: how many entries, for which pool.
struct Refill {
    caller: Arc<str>,
    finapi_client: Arc<str>,
    count: usize,
}

/// Counts of reserved intents since start, for metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ReservedCounts {
    /// Written ahead (committed).
    pub reserved: u64,
    /// Taken by a session.
    pub taken: u64,
    /// Discarded unused (expired, of an older password key, or at shutdown).
    pub discarded: u64,
}

/// The pools of reserved intents of one broker (see the module documentation).
#[derive(Debug)]
pub struct ReservedIntents {
    /// Most entries per pool; 0: off.
    cap: usize,
    /// Age from which an entry is not used, in ms ([`max_age`]).
    max_age: Millis,
    pools: Mutex<Pools>,
    /// Refills and discards in flight; shutdown waits for none.
    background: watch::Sender<usize>,
    reserved: AtomicU64,
    taken: AtomicU64,
    discarded: AtomicU64,
}

#[derive(Debug, Default)]
struct Pools {
    by_owner: HashMap<(Arc<str>, Arc<str>), Pool>,
    /// Shutdown began: no more refills, and refills in flight delete what they wrote.
    closed: bool,
}

/// The age from which a reserved intent is not used: half the margin between the reaper's
/// orphan age and the longest request, (`orphan_min_age` − `request_timeout`) / 2 (module
/// documentation); zero when the margin is (which the config refuses).
pub fn max_age(orphan_min_age: Duration, request_timeout: Duration) -> Duration {
    orphan_min_age.saturating_sub(request_timeout) / 2
}

impl ReservedIntents {
    /// Pools of at most `cap` entries each (0: off), used while younger than `max_age`.
    pub fn new(cap: usize, max_age: Duration) -> Self {
        Self {
            cap,
            max_age: millis(max_age),
            pools: Mutex::new(Pools::default()),
            background: watch::Sender::new(0),
            reserved: AtomicU64::new(0),
            taken: AtomicU64::new(0),
            discarded: AtomicU64::new(0),
        }
    }

    /// The counts since start.
    pub fn counts(&self) -> ReservedCounts {
        ReservedCounts {
            reserved: self.reserved.load(Ordering::Relaxed),
            taken: self.taken.load(Ordering::Relaxed),
            discarded: self.discarded.load(Ordering::Relaxed),
        }
    }

    /// Entries ready now, in all pools.
    pub fn ready(&self) -> usize {
        self.lock().by_owner.values().map(|p| p.ready.len()).sum()
    }

    /// The entries ready now and younger than [`max_age`], in all pools: each one's id and
    /// password key id. Only those: an older one the sweep has not yet removed may already be
    /// the reaper's.
    fn ready_keys(&self, now: Millis) -> HashMap<Uuid, String> {
        self.lock()
            .by_owner
            .values()
            .flat_map(|pool| pool.ready.iter())
            .filter(|entry| now - entry.created_at < self.max_age)
            .map(|entry| (entry.id, entry.key_id.clone()))
            .collect()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Pools> {
        // No code panics while holding it; a poisoned lock still holds consistent pools.
        self.pools.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn usable(&self, entry: &Reserved, key_id: &str, now: Millis) -> bool {
        entry.key_id == key_id && now - entry.created_at < self.max_age
    }

    /// Takes a usable entry of the caller's pool, if any. Unusable ones met on the way go to
    /// `discard`; a refill to start goes to the answer's second half.
    fn take(
        &self,
        ctx: &RequestContext,
        key_id: &str,
        now: Millis,
        discard: &mut Vec<Uuid>,
    ) -> (Option<Reserved>, Option<Refill>) {
        let mut pools = self.lock();
        let closed = pools.closed;
        let owner = (ctx.caller.clone(), ctx.finapi_client.clone());
        let pool = pools.by_owner.entry(owner).or_default();
        let mut taken = None;
        while let Some(entry) = pool.ready.pop_front() {
            if self.usable(&entry, key_id, now) {
                taken = Some(entry);
                break;
            }
            discard.push(entry.id);
        }
        let recent = pool.last_demand > 0 && now - pool.last_demand < self.max_age;
        pool.last_demand = now;
        if taken.is_none() && recent {
            pool.short = true;
        }
        let wanted = match &taken {
            None => pool.short,
            Some(_) => pool.ready.len() < pool.batch / 2,
        };
        let count = if closed || pool.refilling || !wanted {
            0
        } else {
            if pool.short {
                pool.batch = (pool.batch * 2).clamp(1, self.cap);
                pool.short = false;
            }
            pool.batch.saturating_sub(pool.ready.len())
        };
        let refill = (count > 0).then(|| {
            pool.refilling = true;
            self.background.send_modify(|n| *n += 1);
            Refill {
                caller: ctx.caller.clone(),
                finapi_client: ctx.finapi_client.clone(),
                count,
            }
        });
        if taken.is_some() {
            self.taken.fetch_add(1, Ordering::Relaxed);
        }
        (taken, refill)
    }

    /// Removes the entries that are no longer usable (expired, or of `key_id`'s predecessor)
    /// from every pool and returns their ids; a pool that lost expired entries halves its
    /// refill size.
    fn expire(&self, key_id: &str, now: Millis) -> Vec<Uuid> {
        let mut ids = Vec::new();
        for pool in self.lock().by_owner.values_mut() {
            let before = ids.len();
            pool.ready.retain(|entry| {
                let keep = self.usable(entry, key_id, now);
                if !keep {
                    ids.push(entry.id);
                }
                keep
            });
            if ids.len() > before {
                pool.batch /= 2;
                pool.short = false;
            }
        }
        ids
    }

    /// Deletes `ids`, discarded unused, from the ledger; a failure leaves them to the reaper's
    /// orphan path (never created: finAPI does not know them).
    async fn discard(&self, store: &IdentityStore, ids: &[Uuid]) {
        if ids.is_empty() {
            return;
        }
        // One statement per 128 ids keeps the bound values far below either backend's limit.
        for chunk in ids.chunks(128) {
            if let Err(err) = store.delete_unused_intents(chunk).await {
                tracing::warn!(error = %crate::telemetry::cause_chain(&err), count = chunk.len(),
                    "could not delete unused reserved intents; the reaper closes them");
            }
        }
        self.discarded
            .fetch_add(ids.len() as u64, Ordering::Relaxed);
    }
}

impl Flows {
    fn reserved(&self) -> &Arc<ReservedIntents> {
        &self.identities.reserved
    }

    /// A reserved intent for a session without a reference, made with the password key
    /// `key_id` (the newest), if one is ready; starts a refill or a discard in the background
    /// where needed. `None` when reserved intents are off or the pool is empty.
    pub(super) fn take_reserved(&self, ctx: &RequestContext, key_id: &str) -> Option<Reserved> {
        let reserved = self.reserved();
        if reserved.cap == 0 {
            return None;
        }
        let mut discard = Vec::new();
        let (taken, refill) = reserved.take(ctx, key_id, now_millis(), &mut discard);
        self.discard_in_background(discard);
        if let Some(refill) = refill {
            tokio::spawn(run_refill(
                reserved.clone(),
                self.identities.store.clone(),
                refill,
                key_id.to_owned(),
                millis(self.identities.orphan_min_age),
            ));
        }
        taken
    }

    fn discard_in_background(&self, ids: Vec<Uuid>) {
        if !ids.is_empty() {
            let reserved = self.reserved().clone();
            let store = self.identities.store.clone();
            // Counted like a refill, so that shutdown closes the ledger only after it.
            reserved.background.send_modify(|n| *n += 1);
            tokio::spawn(async move {
                reserved.discard(&store, &ids).await;
                reserved
                    .background
                    .send_modify(|n| *n = n.saturating_sub(1));
            });
        }
    }

    /// Discards the entries made with a key that is no longer the newest (after a reload) or
    /// expired, deleting them from the ledger in the background.
    pub(super) fn discard_unusable_reserved(&self) {
        let key_id = self.identities.keys.current().newest().id().to_owned();
        let ids = self.reserved().expire(&key_id, now_millis());
        self.discard_in_background(ids);
    }

    /// Discards the entries that are no longer usable (expired, or made with a key that is no
    /// longer the newest) and deletes them from the ledger.
    pub async fn sweep_reserved_intents(&self) {
        let key_id = self.identities.keys.current().newest().id().to_owned();
        let ids = self.reserved().expire(&key_id, now_millis());
        self.reserved().discard(&self.identities.store, &ids).await;
    }

    /// At shutdown, once no request runs: no more refills, deletes every entry still ready
    /// from the ledger, and waits for the refills and discards in flight (a refill deletes
    /// what it wrote).
    pub async fn release_reserved_intents(&self) {
        let reserved = self.reserved();
        let ids: Vec<Uuid> = {
            let mut pools = reserved.lock();
            pools.closed = true;
            pools
                .by_owner
                .values_mut()
                .flat_map(|pool| pool.ready.drain(..))
                .map(|entry| entry.id)
                .collect()
        };
        reserved.discard(&self.identities.store, &ids).await;
        let mut background = reserved.background.subscribe();
        let _ = background.wait_for(|n| *n == 0).await;
    }

    /// `count`, the password key ids of the ledger's records not yet deleted (read by `count`),
    /// less the entries that were ready in a pool throughout that read: those are intents no
    /// session took, and a new newest key retires them without a finAPI call, so they need no
    /// key to stay configured. An entry taken or written meanwhile stays counted.
    pub(super) async fn key_ids_needed<E>(
        &self,
        count: impl Future<Output = Result<Vec<(String, u64)>, E>>,
    ) -> Result<Vec<(String, u64)>, E> {
        let before = self.reserved().ready_keys(now_millis());
        let mut in_use = count.await?;
        let after = self.reserved().ready_keys(now_millis());
        for (id, key_id) in &before {
            if after.contains_key(id)
                && let Some((_, n)) = in_use.iter_mut().find(|(k, _)| k == key_id)
            {
                *n = n.saturating_sub(1);
            }
        }
        Ok(in_use)
    }

    /// The reserved intents' counts since start.
    pub fn reserved_intent_counts(&self) -> ReservedCounts {
        self.reserved().counts()
    }

    /// Reserved intents ready now, in all pools.
    pub fn reserved_intents_ready(&self) -> usize {
        self.reserved().ready()
    }
}

/// Writes `refill.count` intents ahead, queued at once so that they share a group commit, and
/// pools those that were committed (or deletes them, if shutdown began meanwhile). A failed
/// write is left to the reaper: it may have been committed before the failure was seen.
async fn run_refill(
    reserved: Arc<ReservedIntents>,
    store: IdentityStore,
    refill: Refill,
    key_id: String,
    orphan_min_age: Millis,
) {
    let created_at = now_millis();
    let entries: Vec<Reserved> = (0..refill.count)
        .map(|_| Reserved {
            id: Uuid::now_v7(),
            finapi_user_id: generate_user_id(),
            key_id: key_id.clone(),
            created_at,
        })
        .collect();
    let intents: Vec<NewIdentity<'_>> = entries
        .iter()
        .map(|entry| NewIdentity {
            id: entry.id,
            finapi_user_id: &entry.finapi_user_id,
            caller: &refill.caller,
            reference_digest: None,
            key_id: &entry.key_id,
            finapi_client: &refill.finapi_client,
            now: created_at,
            delete_after: created_at.saturating_add(orphan_min_age),
        })
        .collect();
    let results = store.insert_intents(&intents).await;
    drop(intents);
    let mut failed = None;
    let written: Vec<Reserved> = entries
        .into_iter()
        .zip(results)
        .filter_map(|(entry, result)| match result {
            Ok(()) => Some(entry),
            Err(err) => {
                failed.get_or_insert(err);
                None
            }
        })
        .collect();
    if let Some(err) = failed {
        tracing::warn!(error = %crate::telemetry::cause_chain(&err),
            "could not reserve intents; sessions write their own, the reaper resolves any written");
    }
    reserved
        .reserved
        .fetch_add(written.len() as u64, Ordering::Relaxed);
    let leftover: Vec<Uuid> = {
        let mut pools = reserved.lock();
        let closed = pools.closed;
        let owner = (refill.caller, refill.finapi_client);
        let pool = pools.by_owner.entry(owner).or_default();
        pool.refilling = false;
        if closed {
            written.into_iter().map(|entry| entry.id).collect()
        } else {
            pool.ready.extend(written);
            Vec::new()
        }
    };
    reserved.discard(&store, &leftover).await;
    reserved
        .background
        .send_modify(|n| *n = n.saturating_sub(1));
}

/// Sweeps the reserved intents every `max_age / 2` (at most every 100 ms) until `stop` turns
/// true, so that an unused entry is deleted by the broker at most 1.5 × `max_age` after its
/// reservation, before the reaper's orphan age (2 × `max_age` + the request timeout).
pub async fn run_sweeper(flows: Arc<Flows>, mut stop: watch::Receiver<bool>) {
    let reserved = flows.reserved();
    if reserved.cap == 0 {
        return;
    }
    let period = Duration::from_millis(u64::try_from(reserved.max_age / 2).unwrap_or(0))
        .max(Duration::from_millis(100));
    loop {
        tokio::select! {
            _ = tokio::time::sleep(period) => {}
            _ = stop.wait_for(|stopped| *stopped) => return,
        }
        flows.sweep_reserved_intents().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ctx() -> RequestContext {
        RequestContext {
            request_id: Arc::from("r"),
            caller: Arc::from("c"),
            finapi_client: Arc::from("default"),
            end_user: crate::finapi::EndUserMetadata::default(),
        }
    }

    fn entry(created_at: Millis, key_id: &str) -> Reserved {
        Reserved {
            id: Uuid::now_v7(),
            finapi_user_id: generate_user_id(),
            key_id: key_id.to_owned(),
            created_at,
        }
    }

    fn fill(pools: &ReservedIntents, entries: Vec<Reserved>) {
        let mut p = pools.lock();
        let pool = p
            .by_owner
            .entry((Arc::from("c"), Arc::from("default")))
            .or_default();
        pool.refilling = false;
        pool.ready.extend(entries);
    }

    #[test]
    fn the_age_bound_keeps_half_the_margin_between_request_and_reaper() {
        let bound = max_age(Duration::from_secs(120), Duration::from_secs(30));
        assert_eq!(bound, Duration::from_secs(45));
        assert_eq!(
            max_age(Duration::from_secs(3), Duration::from_secs(5)),
            Duration::ZERO
        );
    }

    #[test]
    fn a_quiet_pool_reserves_nothing_and_steady_misses_double_the_refill_up_to_the_cap() {
        let pools = ReservedIntents::new(4, Duration::from_secs(10));
        let mut discard = Vec::new();
        // The first session after a quiet time: no refill.
        let (taken, refill) = pools.take(&ctx(), "k", 1_000, &mut discard);
        assert!(taken.is_none() && refill.is_none());
        let mut sizes = Vec::new();
        for n in 1..=4 {
            let (taken, refill) = pools.take(&ctx(), "k", 1_000 + n, &mut discard);
            assert!(taken.is_none());
            sizes.push(refill.expect("a refill").count);
            // A refill in flight is not doubled.
            assert!(pools.take(&ctx(), "k", 1_000 + n, &mut discard).1.is_none());
            fill(&pools, Vec::new());
        }
        assert_eq!(sizes, [1, 2, 4, 4]);
        assert!(discard.is_empty());
    }

    #[test]
    fn expired_entries_and_those_of_an_older_key_are_discarded_not_taken() {
        let pools = ReservedIntents::new(8, Duration::from_secs(10));
        let old = entry(0, "k");
        let rotated = entry(9_000, "old-key");
        let fresh = entry(9_000, "k");
        let (old_id, rotated_id, fresh_id) = (old.id, rotated.id, fresh.id);
        fill(&pools, vec![old, rotated, fresh]);
        let mut discard = Vec::new();
        let (taken, _) = pools.take(&ctx(), "k", 10_000, &mut discard);
        assert_eq!(taken.map(|t| t.id), Some(fresh_id));
        assert_eq!(discard, [old_id, rotated_id]);
    }

    #[test]
    fn a_sweep_removes_expired_entries_and_halves_the_refill() {
        let pools = ReservedIntents::new(8, Duration::from_secs(10));
        let stale = entry(0, "k");
        let stale_id = stale.id;
        fill(&pools, vec![stale, entry(5_000, "k")]);
        pools.lock().by_owner.values_mut().for_each(|p| p.batch = 8);
        assert_eq!(pools.expire("k", 10_000), [stale_id]);
        assert_eq!(pools.ready(), 1);
        assert!(pools.lock().by_owner.values().all(|p| p.batch == 4));
    }
}
