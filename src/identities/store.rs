//! STUB of the ledger store (the real one comes from branch h12-store); compile-only.
#![allow(missing_docs, unused_variables, clippy::unused_async)]

use secrecy::SecretString;
use uuid::Uuid;

pub type Millis = i64;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IdentityState {
    Intent,
    Active,
    Deleting,
    Deleted,
}
impl IdentityState {
    pub fn as_str(self) -> &'static str {
        "x"
    }
}

#[derive(Clone, Debug)]
pub struct IdentityRecord {
    pub id: Uuid,
    pub finapi_user_id: String,
    pub caller: String,
    pub reference_digest: Option<String>,
    pub key_id: String,
    pub finapi_client: String,
    pub state: IdentityState,
    pub created_at: Millis,
    pub last_session_at: Option<Millis>,
    pub delete_after: Millis,
    pub deleted_at: Option<Millis>,
    pub deletion_attempts: u32,
    pub last_error: Option<String>,
    pub next_attempt_at: Millis,
}

pub struct NewIdentity<'a> {
    pub id: Uuid,
    pub finapi_user_id: &'a str,
    pub caller: &'a str,
    pub reference_digest: Option<&'a str>,
    pub key_id: &'a str,
    pub finapi_client: &'a str,
    pub now: Millis,
    pub delete_after: Millis,
}

pub enum Inserted {
    New,
    Existing(IdentityRecord),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EventKind {
    Created,
    Reused,
    Deleted,
    DeletionFailed,
    NeverCreated,
}
impl EventKind {
    pub fn as_str(self) -> &'static str {
        "x"
    }
}

#[derive(Clone, Debug)]
pub struct IdentityEvent {
    pub kind: EventKind,
    pub caller: String,
    pub request_id: Option<String>,
    pub at: Millis,
    pub detail: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("unavailable")]
    Unavailable(#[source] std::io::Error),
    #[error("schema too new")]
    SchemaTooNew { version: i64 },
    #[error("other")]
    Other(#[source] std::io::Error),
    #[error("invalid url")]
    InvalidUrl(String),
}

#[derive(Clone)]
pub struct IdentityStore;

impl IdentityStore {
    pub async fn connect(url: &SecretString, max_connections: u32) -> Result<Self, StoreError> {
        todo!()
    }
    pub fn backend(&self) -> &'static str {
        todo!()
    }
    pub async fn ping(&self) -> Result<(), StoreError> {
        todo!()
    }
    pub async fn insert_intent(&self, new: &NewIdentity<'_>) -> Result<Inserted, StoreError> {
        todo!()
    }
    pub async fn find_live(
        &self,
        caller: &str,
        d: &str,
    ) -> Result<Option<IdentityRecord>, StoreError> {
        todo!()
    }
    pub async fn find_latest(
        &self,
        caller: &str,
        d: &str,
    ) -> Result<Option<IdentityRecord>, StoreError> {
        todo!()
    }
    pub async fn find_by_finapi_user(&self, u: &str) -> Result<Option<IdentityRecord>, StoreError> {
        todo!()
    }
    pub async fn get(&self, id: Uuid) -> Result<Option<IdentityRecord>, StoreError> {
        todo!()
    }
    pub async fn activate(
        &self,
        id: Uuid,
        now: Millis,
        delete_after: Millis,
    ) -> Result<(), StoreError> {
        todo!()
    }
    pub async fn touch(
        &self,
        id: Uuid,
        now: Millis,
        delete_after: Millis,
    ) -> Result<(), StoreError> {
        todo!()
    }
    pub async fn mark_deleting(&self, id: Uuid, now: Millis) -> Result<(), StoreError> {
        todo!()
    }
    pub async fn mark_deleted(&self, id: Uuid, now: Millis) -> Result<(), StoreError> {
        todo!()
    }
    pub async fn record_failure(
        &self,
        id: Uuid,
        code: &str,
        next: Millis,
    ) -> Result<(), StoreError> {
        todo!()
    }
    pub async fn claim_due(
        &self,
        now: Millis,
        orphan_min_age: Millis,
        owner: &str,
        lease: Millis,
        limit: u32,
    ) -> Result<Vec<IdentityRecord>, StoreError> {
        todo!()
    }
    pub async fn release(&self, id: Uuid, owner: &str) -> Result<(), StoreError> {
        todo!()
    }
    pub async fn append_event(
        &self,
        identity_id: Uuid,
        kind: EventKind,
        caller: &str,
        request_id: Option<&str>,
        at: Millis,
        detail: Option<&str>,
    ) -> Result<(), StoreError> {
        todo!()
    }
    pub async fn recent_events(
        &self,
        identity_id: Uuid,
        limit: u32,
    ) -> Result<Vec<IdentityEvent>, StoreError> {
        todo!()
    }
    pub async fn counts_by_state(&self) -> Result<Vec<(IdentityState, u64)>, StoreError> {
        todo!()
    }
    pub async fn oldest_overdue(&self, now: Millis) -> Result<Option<Millis>, StoreError> {
        todo!()
    }
}
