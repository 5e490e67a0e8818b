//! Managed finAPI identities: every finAPI user the access flow creates is recorded in the
//! ledger before it exists, reused for the same end customer, and deleted for certain.
//!
//! The life of an identity (states as the ledger stores them):
//!
//! - `intent`: written before `POST /api/v2/users`, so that no user exists the ledger does not
//!   know. A session that completes turns it `active`; one that fails turns it `deleting`, not
//!   before `orphan_min_age` (a lost `POST` may still be carried out by finAPI); one whose broker
//!   dies leaves it `intent`, which the reaper resolves once older than `orphan_min_age`.
//! - `active`: sessions for the same (caller, reference) get a new token for it (password grant
//!   with the derived password); it is due for deletion `retention` after its last session.
//! - `deleting`: the reaper (or a caller's `DELETE`) logs in and deletes the user, retrying with
//!   capped backoff for as long as that fails. finAPI not knowing the user counts as deleted
//!   (finAPI answers `400` to a password grant for an unknown user: `finapi-reference.md`).
//! - `deleted`: closed; the record and its events stay for audit.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use uuid::Uuid;

use crate::finapi::{AccessToken, NewUser, Step};
use crate::identities::keys::{PasswordKey, SharedPasswordKeys};
use crate::identities::{
    ChangeEvent, EventKind, IdentityRecord, IdentityState, IdentityStore, Inserted, Millis,
    NewIdentity, StoreError,
};
use crate::resilience::Deadline;

use super::access::generate_user_id;
use super::{ClientReference, Email, FlowError, Flows, KycSession, Phone, RequestContext};

/// How often a session waiting for a concurrent session's identity looks again.
const INTENT_POLL: Duration = Duration::from_millis(25);
/// How long a caller's deletion in progress holds its record against the reaper and other
/// requests (a lease, as the reaper's claims).
const DELETION_LEASE: Duration = Duration::from_secs(120);
/// Longest wait between two deletion attempts of one identity.
const MAX_DELETION_BACKOFF: Duration = Duration::from_secs(3600);
/// Answers "unknown user" in a row that close an identity's record.
const UNKNOWN_CONFIRMATIONS: u32 = 2;
/// Events shown with a record.
pub const RECENT_EVENTS: u32 = 20;
/// Failed deletions of one identity from which each further failure is logged at warn.
pub const WARN_AFTER_FAILED_DELETIONS: u32 = 3;

/// The current time as the ledger keeps it: Unix milliseconds.
pub fn now_millis() -> Millis {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| {
        Millis::try_from(d.as_millis()).unwrap_or(Millis::MAX)
    })
}

/// A duration in the ledger's unit, saturating.
pub(super) fn millis(d: Duration) -> Millis {
    Millis::try_from(d.as_millis()).unwrap_or(Millis::MAX)
}

/// How the session's identity came about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IdentityUse {
    /// A new finAPI user was created.
    Created,
    /// The caller's existing identity for the reference was used again.
    Reused,
}

impl IdentityUse {
    /// `created` or `reused`, as the API says.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Created => "created",
            Self::Reused => "reused",
        }
    }
}

/// The identity behind an access session.
#[derive(Debug, Clone)]
pub struct SessionIdentity {
    /// Created or reused.
    pub used: IdentityUse,
    /// When the identity will be deleted unless another session comes first (Unix ms).
    pub delete_after: Millis,
}

/// What a deletion achieved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Deletion {
    /// finAPI deleted the user.
    Deleted,
    /// finAPI does not know the user (deleted elsewhere, or never created): closed.
    Unknown,
    /// finAPI could not delete it now; tried again at `retry_at` (Unix ms).
    Scheduled {
        /// The error code of the failure ([`FlowError::code`]: `LOCKED`, …).
        code: &'static str,
        /// Unix ms of the next attempt.
        retry_at: Millis,
    },
    /// Another request or a reaper holds the identity's deletion (its lease): this request
    /// did nothing, and the record shows how far that deletion is.
    InProgress,
}

/// The ledger settings and the password keys, built once at start-up.
pub struct IdentitySettings {
    /// The ledger.
    pub store: IdentityStore,
    /// The password keys, the newest first; a reload replaces them.
    pub keys: SharedPasswordKeys,
    /// Time from an identity's last session to its deletion, unless its caller says otherwise.
    pub retention: Duration,
    /// Retention per caller name, where configured; a reload of the callers replaces it.
    pub retention_by_caller: std::sync::RwLock<HashMap<String, Duration>>,
    /// Age from which an intent nobody completed is resolved by the reaper.
    pub orphan_min_age: Duration,
    /// The reaper's period.
    pub reaper_interval: Duration,
    /// Intents written ahead for sessions without a reference (`super::reserved`).
    pub reserved: Arc<super::reserved::ReservedIntents>,
}

impl IdentitySettings {
    /// The retention of `caller`'s identities.
    pub fn retention_for(&self, caller: &str) -> Duration {
        self.retention_by_caller
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .get(caller)
            .copied()
            .unwrap_or(self.retention)
    }
}

/// A record as the identity endpoints show it, with its recent events.
#[derive(Debug, Clone)]
pub struct IdentityView {
    /// The record.
    pub record: IdentityRecord,
    /// Its events, the newest first.
    pub events: Vec<crate::identities::IdentityEvent>,
}

/// The outcome of creating an identity for a reference: the session, or another session's
/// intent came first.
enum Creation {
    Done(KycSession),
    Taken,
}

impl Flows {
    fn ids(&self) -> &IdentitySettings {
        &self.identities
    }

    /// The password keys in use now, the newest first.
    pub fn password_keys(&self) -> Arc<crate::identities::keys::PasswordKeys> {
        self.ids().keys.current()
    }

    /// Uses `keys` from now on (a reload); the caller has checked that no live identity needs
    /// a key left out ([`Flows::password_keys_in_use`]).
    pub fn replace_password_keys(&self, keys: crate::identities::keys::PasswordKeys) {
        self.ids().keys.replace(keys);
        // Reserved intents name the key of their reservation: a new newest key retires them.
        self.discard_unusable_reserved();
    }

    /// The ids of the password keys live identities were made with, and how many each
    /// (intents written ahead and not taken are none: `super::reserved`).
    pub async fn password_keys_in_use(&self) -> Result<Vec<(String, u64)>, FlowError> {
        Ok(self
            .key_ids_needed(self.ids().store.key_ids_in_use())
            .await?)
    }

    /// Uses the callers' own retentions `by_caller` from now on (a reload of the callers).
    pub fn replace_retention_by_caller(&self, by_caller: HashMap<String, Duration>) {
        *self
            .ids()
            .retention_by_caller
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = by_caller;
    }

    /// The access flow: a token for the caller's identity for `reference` (reused while it
    /// lives), or for a new identity.
    pub(super) async fn access(
        &self,
        reference: Option<&ClientReference>,
        email: Option<Email>,
        phone: Option<Phone>,
        ctx: &RequestContext,
        deadline: &Deadline,
    ) -> Result<KycSession, FlowError> {
        loop {
            if deadline.remaining().is_zero() {
                return Err(FlowError::BudgetExhausted(Step::CreateUser));
            }
            let Some(reference) = reference else {
                // Without a reference no other session's intent can take this one's place.
                match self
                    .create_identity(None, email.clone(), phone.clone(), ctx, deadline)
                    .await?
                {
                    Creation::Done(session) => return Ok(session),
                    Creation::Taken => continue,
                }
            };
            let live = self
                .live_identity(&ctx.caller, &ctx.finapi_client, reference)
                .await?;
            let Some(record) = live else {
                match self
                    .create_identity(Some(reference), email.clone(), phone.clone(), ctx, deadline)
                    .await?
                {
                    Creation::Done(session) => return Ok(session),
                    Creation::Taken => continue,
                }
            };
            match record.state {
                IdentityState::Active => {
                    if let Some(session) = self.reuse(&record, ctx, deadline).await? {
                        return Ok(session);
                    }
                }
                // Another session is creating it: wait for it to complete or fail, unless its
                // creator is long gone (its broker died), in which case resolve it here.
                _ if now_millis() - record.created_at >= millis(self.ids().orphan_min_age) => {
                    self.resolve_stale_intent(&record, ctx, deadline).await?;
                }
                _ => {
                    self.attempt(Step::CreateUser, deadline, tokio::time::sleep(INTENT_POLL))
                        .await?;
                }
            }
        }
    }

    /// Closes the ledger's connections (at shutdown, once requests and the reaper are done).
    pub async fn close_ledger(&self) {
        self.ids().store.close().await;
    }

    /// Whether the ledger answers within a second; also published as a metric.
    pub async fn identity_store_up(&self) -> bool {
        let ping = self.ids().store.ping();
        let up = matches!(
            tokio::time::timeout(Duration::from_secs(1), ping).await,
            Ok(Ok(()))
        );
        crate::telemetry::metrics::publish_store_up(up);
        up
    }

    /// The caller's live identity (intent or active) for `reference` at the finAPI client
    /// `finapi_client`, looked up under every configured key, so that a key rotation does not
    /// split one customer in two.
    async fn live_identity(
        &self,
        caller: &str,
        finapi_client: &str,
        reference: &ClientReference,
    ) -> Result<Option<IdentityRecord>, FlowError> {
        for key in self.ids().keys.current().all() {
            let digest = key.reference_digest(caller, reference.as_str());
            if let Some(record) = self
                .ids()
                .store
                .find_live(caller, finapi_client, &digest)
                .await?
            {
                return Ok(Some(record));
            }
        }
        Ok(None)
    }

    /// The caller's newest identity for `reference` at the finAPI client `finapi_client`,
    /// whatever its state (one identity per caller, client and reference).
    pub async fn find_identity(
        &self,
        caller: &str,
        finapi_client: &str,
        reference: &ClientReference,
    ) -> Result<Option<IdentityView>, FlowError> {
        let mut newest: Option<IdentityRecord> = None;
        for key in self.ids().keys.current().all() {
            let digest = key.reference_digest(caller, reference.as_str());
            if let Some(record) = self
                .ids()
                .store
                .find_latest(caller, finapi_client, &digest)
                .await?
                && newest
                    .as_ref()
                    .is_none_or(|n| record.created_at > n.created_at)
            {
                newest = Some(record);
            }
        }
        let Some(record) = newest else {
            return Ok(None);
        };
        let events = self
            .ids()
            .store
            .recent_events(record.id, RECENT_EVENTS)
            .await?;
        Ok(Some(IdentityView { record, events }))
    }

    /// Records an intent (or takes one written ahead, without a reference), creates the finAPI
    /// user and gets its token. The intent is durable before finAPI hears of the user; whatever
    /// fails afterwards leaves a record the reaper resolves.
    async fn create_identity(
        &self,
        reference: Option<&ClientReference>,
        email: Option<Email>,
        phone: Option<Phone>,
        ctx: &RequestContext,
        deadline: &Deadline,
    ) -> Result<Creation, FlowError> {
        let ids = self.ids();
        let keys = ids.keys.current();
        let key = keys.newest();
        // Without a reference, an intent written ahead (already durable) serves as well as
        // one written now, and saves this session a group commit.
        let reserved = match reference {
            None => self.take_reserved(ctx, key.id()),
            Some(_) => None,
        };
        let (id, user_id, created_at) = match reserved {
            Some(r) => (r.id, r.finapi_user_id, r.created_at),
            None => {
                let user_id = generate_user_id();
                // Time-ordered (UUID v7, RFC 9562), like the user id: the ledger's primary key
                // and the events' index grow at their ends rather than on a random page per
                // insert.
                let id = Uuid::now_v7();
                let digest = reference.map(|r| key.reference_digest(&ctx.caller, r.as_str()));
                let created_at = now_millis();
                let inserted = ids
                    .store
                    .insert_intent(&NewIdentity {
                        id,
                        finapi_user_id: &user_id,
                        caller: &ctx.caller,
                        reference_digest: digest.as_deref(),
                        key_id: key.id(),
                        finapi_client: &ctx.finapi_client,
                        now: created_at,
                        delete_after: created_at + millis(ids.orphan_min_age),
                    })
                    .await?;
                if let Inserted::Existing(_) = inserted {
                    return Ok(Creation::Taken);
                }
                (id, user_id, created_at)
            }
        };
        let password = key.password(&user_id);
        let user = NewUser {
            id: user_id,
            password,
            email: email.map(Email::into_string),
            phone: phone.map(Phone::into_string),
        };
        let finapi_user_id = match self.create_user(&user, ctx, deadline).await {
            Ok(finapi_user_id) => finapi_user_id,
            Err(err) => {
                self.abandon_intent(id, created_at, &err).await;
                return Err(err);
            }
        };
        let now = now_millis();
        let delete_after = now.saturating_add(millis(ids.retention_for(&ctx.caller)));
        // The user exists: its activation and `created` event (one write, committed with
        // those of concurrent sessions) are made durable while finAPI grants its token, not
        // after: the session waits for the longer of the two, not for both (docs/BENCHMARKS.md,
        // "Issue 12: the activation beside the token grant").
        let created = ChangeEvent {
            kind: EventKind::Created,
            caller: &ctx.caller,
            request_id: Some(&ctx.request_id),
            at: now,
            detail: None,
            unchanged_detail: Some("deleted before its first session"),
        };
        // Until this session has settled the record, a drop (its client went away) hands the
        // user to the reaper: its activation may be committed already.
        let mut unsettled = Unsettled {
            store: Some(ids.store.clone()),
            id,
        };
        // Whether the grant was answered before the activation: if not, a deletion may have
        // claimed the active record while the grant ran, and the token would die with it.
        let granted = AtomicBool::new(false);
        let ((activated, granted_first), token) = tokio::join!(
            async {
                let activated = ids
                    .store
                    .activate_logged(id, now, delete_after, &created)
                    .await;
                (activated, granted.load(Ordering::Relaxed))
            },
            async {
                let token = self
                    .user_token(&finapi_user_id, &user.password, ctx, deadline)
                    .await;
                granted.store(true, Ordering::Relaxed);
                token
            },
        );
        unsettled.store = None;
        let token = match (activated, token) {
            // Only a caller's reference reaches a record with `DELETE /identities/{ref}`; one
            // without it can be closed only through its token (not handed out yet) or by the
            // reaper once its retention ends, so it needs no second look (and the sessions
            // that make most identities save a ledger read).
            (Ok(true), Ok(token)) if granted_first || reference.is_none() => token,
            (Ok(true), Ok(token)) => match ids.store.get(id).await {
                // Its deletion began while the token was granted: as for a reuse, this
                // session gets an identity that will live.
                Ok(Some(record)) if record.state != IdentityState::Active => {
                    return Ok(Creation::Taken);
                }
                // Still active; or unknown, and the token is more likely good than not.
                _ => token,
            },
            // Its deletion was asked for while it was being created: it is the reaper's now,
            // and this session gets an identity that will live.
            (Ok(false), Ok(_)) => return Ok(Creation::Taken),
            (activated, Err(err)) => {
                self.stats.user_orphaned();
                match activated {
                    // Active, so no lost `POST` can still create it: due at once.
                    Ok(true) => self.hand_to_reaper(id, now_millis(), &err).await,
                    // Already the reaper's.
                    Ok(false) => {}
                    Err(_) => self.abandon_intent(id, created_at, &err).await,
                }
                return Err(FlowError::OrphanedUser {
                    user_id: finapi_user_id,
                    source: Box::new(err),
                });
            }
            // The record stays an intent, which the reaper resolves: the user is deleted.
            (Err(store_err), Ok(_)) => return Err(store_err.into()),
        };
        Ok(Creation::Done(session(
            token,
            finapi_user_id,
            IdentityUse::Created,
            delete_after,
        )))
    }

    /// A session that failed after its intent was written: the user may exist (or come to
    /// exist, if a lost `POST` is still carried out), so the record goes to the reaper, which
    /// resolves it once `orphan_min_age` has passed. It no longer blocks a new identity for
    /// the same reference.
    async fn abandon_intent(&self, id: Uuid, created_at: Millis, err: &FlowError) {
        let not_before = created_at.saturating_add(millis(self.ids().orphan_min_age));
        self.hand_to_reaper(id, not_before, err).await;
    }

    /// A session that failed after its record was written: the record goes to the reaper, to
    /// be deleted from `not_before` on. If that write fails, the record stays as it is (an
    /// intent or an active identity), which the reaper resolves all the same.
    async fn hand_to_reaper(&self, id: Uuid, not_before: Millis, err: &FlowError) {
        tracing::debug!(identity_id = %id, code = err.code(),
            "identity not completed; the reaper resolves it");
        if let Err(store_err) = self.ids().store.mark_deleting(id, not_before).await {
            // The record stays: the reaper deletes an intent once `orphan_min_age` has passed,
            // an active identity once its retention has.
            tracing::warn!(identity_id = %id, error = %store_err,
                "could not hand a failed identity to the reaper; it stays as it was");
        }
    }

    /// A new token for an active identity. `None` when finAPI no longer knows the user: the
    /// record is closed and the caller gets a new identity.
    async fn reuse(
        &self,
        record: &IdentityRecord,
        ctx: &RequestContext,
        deadline: &Deadline,
    ) -> Result<Option<KycSession>, FlowError> {
        let Some(token) = self.login(record, ctx, deadline).await? else {
            self.close(record, EventKind::Deleted, ctx, Some("unknown to finAPI"))
                .await?;
            return Ok(None);
        };
        let now = now_millis();
        let delete_after = now.saturating_add(millis(self.ids().retention_for(&ctx.caller)));
        let reused = ChangeEvent {
            kind: EventKind::Reused,
            caller: &ctx.caller,
            request_id: Some(&ctx.request_id),
            at: now,
            detail: None,
            unchanged_detail: None,
        };
        if !self
            .ids()
            .store
            .touch_logged(record.id, now, delete_after, &reused)
            .await?
        {
            // Its deletion began meanwhile: the token would die with it.
            return Ok(None);
        }
        Ok(Some(session(
            token,
            record.finapi_user_id.clone(),
            IdentityUse::Reused,
            delete_after,
        )))
    }

    /// An intent whose session is long over without completing it (its broker died): if the
    /// user exists it becomes active (and is reused), otherwise it is closed as never created.
    async fn resolve_stale_intent(
        &self,
        record: &IdentityRecord,
        ctx: &RequestContext,
        deadline: &Deadline,
    ) -> Result<(), FlowError> {
        match self.login(record, ctx, deadline).await? {
            Some(_) => {
                let now = now_millis();
                let delete_after =
                    now.saturating_add(millis(self.ids().retention_for(&ctx.caller)));
                self.ids()
                    .store
                    .activate(record.id, now, delete_after)
                    .await?;
                Ok(())
            }
            None => self.close(record, EventKind::NeverCreated, ctx, None).await,
        }
    }

    /// Deletes the identity's finAPI user: logs in with its derived password and deletes it.
    /// The record is updated with the outcome (deleted, or a failure with its next attempt);
    /// the caller has moved it to `deleting` and holds it against the reaper.
    pub async fn delete_identity(&self, record: &IdentityRecord, ctx: &RequestContext) -> Deletion {
        // Deleted through the client that made it: the user exists at that client only.
        let ctx = &RequestContext {
            finapi_client: record.finapi_client.as_str().into(),
            ..ctx.clone()
        };
        let deadline = Deadline::after(self.session_budget);
        let outcome = self.try_delete(record, ctx, &deadline).await;
        let store = &self.ids().store;
        let now = now_millis();
        let result = match &outcome {
            Ok(true) => self.close(record, EventKind::Deleted, ctx, None).await,
            Ok(false) => {
                // Never active: its creation failed or never finished, and finAPI confirms
                // there is no such user.
                let kind = if record.last_session_at.is_none() {
                    EventKind::NeverCreated
                } else {
                    EventKind::Deleted
                };
                self.close(record, kind, ctx, Some("unknown to finAPI"))
                    .await
            }
            Err(_) => Ok(()),
        };
        if let Err(err) = result {
            tracing::warn!(identity_id = %record.id, error = %err,
                "finAPI user deleted, but the ledger could not record it; the reaper will find it gone");
        }
        let deletion = match outcome {
            Ok(true) => Deletion::Deleted,
            Ok(false) => Deletion::Unknown,
            Err(err) => {
                let code = err.code();
                let attempts = record.deletion_attempts.saturating_add(1);
                let retry_at = now.saturating_add(millis(self.deletion_backoff(attempts)));
                if attempts >= WARN_AFTER_FAILED_DELETIONS {
                    tracing::warn!(identity_id = %record.id, attempts, code, error = %err,
                        "deleting a finAPI identity keeps failing; retrying");
                } else {
                    tracing::info!(identity_id = %record.id, attempts, code, error = %err,
                        "deleting a finAPI identity failed; retrying");
                }
                if let Err(store_err) = store.record_failure(record.id, code, retry_at).await {
                    tracing::warn!(identity_id = %record.id, error = %store_err,
                        "could not record a failed deletion");
                }
                self.event(record.id, EventKind::DeletionFailed, ctx, Some(code))
                    .await;
                Deletion::Scheduled { code, retry_at }
            }
        };
        let outcome = match &deletion {
            Deletion::Deleted => "deleted",
            Deletion::Unknown => "unknown",
            Deletion::Scheduled { code, .. } => code,
            // Only a request that left the deletion to another says so, not this one.
            Deletion::InProgress => return deletion,
        };
        crate::telemetry::metrics::count_identity_deletion(outcome);
        deletion
    }

    /// `Ok(true)`: deleted; `Ok(false)`: finAPI does not know the user.
    async fn try_delete(
        &self,
        record: &IdentityRecord,
        ctx: &RequestContext,
        deadline: &Deadline,
    ) -> Result<bool, FlowError> {
        let Some(token) = self.login(record, ctx, deadline).await? else {
            return Ok(false);
        };
        let result = self
            .attempt(
                Step::DeleteUser,
                deadline,
                self.upstream(ctx)?.access.delete_user(
                    &token.token,
                    &ctx.request_id,
                    &ctx.end_user,
                ),
            )
            .await?;
        match result.map_err(super::user_call_error) {
            Ok(()) => Ok(true),
            // Deleted in the meantime (deleting a user invalidates its tokens).
            Err(FlowError::UserTokenRejected(_)) => Ok(false),
            Err(err) => Err(err),
        }
    }

    /// Logs in as the identity's user: `Ok(None)` when finAPI does not know it. A record is
    /// closed on that answer, so one stray `400` is not enough: the grant is made again and
    /// [`UNKNOWN_CONFIRMATIONS`] answers in a row must say so.
    async fn login(
        &self,
        record: &IdentityRecord,
        ctx: &RequestContext,
        deadline: &Deadline,
    ) -> Result<Option<AccessToken>, FlowError> {
        let key = self.key_of(record)?;
        let password = key.password(&record.finapi_user_id);
        let mut unknown = 0;
        loop {
            match self
                .user_token(&record.finapi_user_id, &password, ctx, deadline)
                .await
            {
                Ok(token) => return Ok(Some(token)),
                Err(err) if is_unknown_user(&err) => {
                    unknown += 1;
                    if unknown >= UNKNOWN_CONFIRMATIONS {
                        return Ok(None);
                    }
                }
                Err(err) => return Err(err),
            }
        }
    }

    fn deletion_backoff(&self, attempts: u32) -> Duration {
        let exp = attempts.saturating_sub(1).min(20);
        self.ids()
            .reaper_interval
            .saturating_mul(1 << exp)
            .min(MAX_DELETION_BACKOFF)
    }

    /// Starts the deletion of the caller's identity for `reference`: `None` when there is no
    /// live one. A deletion that cannot be done now is left to the reaper; one that another
    /// request or a reaper is doing is left to it ([`Deletion::InProgress`]).
    pub async fn delete_identity_of(
        &self,
        reference: &ClientReference,
        ctx: &RequestContext,
    ) -> Result<Option<(Deletion, IdentityView)>, FlowError> {
        let Some(view) = self
            .find_identity(&ctx.caller, &ctx.finapi_client, reference)
            .await?
        else {
            return Ok(None);
        };
        let record = view.record;
        let now = now_millis();
        let not_before = record
            .created_at
            .saturating_add(millis(self.ids().orphan_min_age));
        // Never active and young: a `POST /api/v2/users` for it may still be under way (its
        // session's, or a lost one), so a login now could find no user and close the record
        // just before finAPI makes the user, which nothing would then delete. A record that
        // left `intent` for `deleting` keeps `last_session_at` unset, so this cannot change
        // between the read and the decision.
        let creating = match record.state {
            IdentityState::Intent => true,
            IdentityState::Deleting => record.last_session_at.is_none() && now < not_before,
            IdentityState::Active | IdentityState::Deleted => false,
        };
        let deletion = if record.state == IdentityState::Deleted {
            return Ok(None);
        } else if creating {
            // The reaper deletes it once no lost call can still create it.
            if record.state == IdentityState::Intent {
                self.ids()
                    .store
                    .mark_deleting(record.id, not_before)
                    .await?;
            }
            Deletion::Scheduled {
                code: "CREATION_IN_PROGRESS",
                retry_at: not_before,
            }
        } else {
            // Active, or deleting since its first session: claimed with a lease, as the reaper
            // claims, so that of concurrent deletions (other requests, the reaper of any
            // replica) one works on it and the others leave it.
            let owner = Uuid::new_v4().to_string();
            let claimed = self
                .ids()
                .store
                .claim_for_deletion(record.id, &owner, now, millis(DELETION_LEASE))
                .await?;
            match claimed {
                Some(claimed) => self.delete_identity(&claimed, ctx).await,
                None => Deletion::InProgress,
            }
        };
        let store = &self.ids().store;
        let record = store.get(record.id).await?.unwrap_or(record);
        let events = store.recent_events(record.id, RECENT_EVENTS).await?;
        Ok(Some((deletion, IdentityView { record, events })))
    }

    /// Closes the record of the identity whose finAPI user `finapi_user_id` was just deleted
    /// through a user token (`DELETE /kyc-sessions/current`), if the broker made it. Failures
    /// are only logged: the user is gone, and the reaper finds it so.
    pub async fn close_deleted_user(&self, finapi_user_id: &str, ctx: &RequestContext) {
        let store = &self.ids().store;
        match store.find_by_finapi_user(finapi_user_id).await {
            Ok(Some(record)) if record.state != IdentityState::Deleted => {
                if let Err(err) = self.close(&record, EventKind::Deleted, ctx, None).await {
                    tracing::warn!(identity_id = %record.id, error = %err,
                        "could not close the ledger record of a deleted user");
                }
            }
            Ok(_) => {}
            Err(err) => {
                tracing::warn!(error = %err, "could not look up the ledger record of a deleted user");
            }
        }
    }

    async fn close(
        &self,
        record: &IdentityRecord,
        kind: EventKind,
        ctx: &RequestContext,
        detail: Option<&str>,
    ) -> Result<(), FlowError> {
        // The event first: whoever reads the record as deleted finds why.
        self.event(record.id, kind, ctx, detail).await;
        self.ids()
            .store
            .mark_deleted(record.id, now_millis())
            .await?;
        Ok(())
    }

    /// Appends an event; a failure is logged, since the state change it reports is recorded
    /// (or, for a closing record, is about to be).
    async fn event(&self, id: Uuid, kind: EventKind, ctx: &RequestContext, detail: Option<&str>) {
        let result = self
            .ids()
            .store
            .append_event(
                id,
                kind,
                &ctx.caller,
                Some(&ctx.request_id),
                now_millis(),
                detail,
            )
            .await;
        if let Err(err) = result {
            tracing::warn!(identity_id = %id, error = %err, "could not append an identity event");
        }
    }

    fn key_of(&self, record: &IdentityRecord) -> Result<Arc<PasswordKey>, FlowError> {
        self.ids()
            .keys
            .current()
            .by_id(&record.key_id)
            .cloned()
            .ok_or_else(|| FlowError::PasswordKeyMissing {
                key_id: record.key_id.clone(),
            })
    }
}

fn session(
    token: AccessToken,
    user_id: String,
    used: IdentityUse,
    delete_after: Millis,
) -> KycSession {
    KycSession {
        access_token: token.token,
        token_type: token.token_type,
        expires_in: token.expires_in,
        flow: crate::config::FlowKind::Access,
        user_id: Some(user_id),
        identity: Some(SessionIdentity { used, delete_after }),
    }
}

/// finAPI answers `400` to a password grant for an unknown or deleted user (and for a wrong
/// password, which the derived one never is): `finapi-reference.md`, "Existing user identities".
fn is_unknown_user(err: &FlowError) -> bool {
    matches!(err, FlowError::Upstream(e) if e.status().map(|s| s.as_u16()) == Some(400))
}

impl From<StoreError> for FlowError {
    fn from(err: StoreError) -> Self {
        Self::Store(Arc::new(err))
    }
}

/// The record of a user finAPI created for a session that has not settled it yet (active with a
/// token, or handed to the reaper). If the session's future is dropped first (its client went
/// away), the record goes to the reaper at once: no lost `POST` can still create the user, and
/// an activation committed meanwhile would otherwise keep it until its retention ends.
struct Unsettled {
    /// `None` once the session has settled the record.
    store: Option<IdentityStore>,
    id: Uuid,
}

impl Drop for Unsettled {
    fn drop(&mut self) {
        let Some(store) = self.store.take() else {
            return;
        };
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return; // Shutting down: the reaper of the next start resolves the record.
        };
        let id = self.id;
        runtime.spawn(async move {
            // Ordered either way with a queued activation: `intent` or `active` → `deleting`;
            // an activation that comes second finds it deleting and leaves it.
            if let Err(err) = store.mark_deleting(id, now_millis()).await {
                tracing::warn!(identity_id = %id, error = %err,
                    "could not hand an abandoned identity to the reaper; it stays as it was");
            }
        });
    }
}
