//! The simulated finAPI data: clients, tokens, users and processes, each table bounded and
//! with expired entries swept.

use std::borrow::Borrow;
use std::collections::VecDeque;
use std::collections::hash_map::{Entry as MapEntry, HashMap};
use std::hash::Hash;
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::time::{Duration, Instant};

use super::SimConfig;
use super::faults::{FaultRule, Faults};
use super::stats::{
    CallLog, ConnectionCounters, ConnectionStats, Counters, PsuHeaders, PsuLog, Stats,
};
use super::wire::{ApiError, UserOut};

/// finAPI deletes the hidden user of a process one day after an exchange with `invalidate=true`
/// and 30 days after the process otherwise.
const HIDDEN_USER_GRACE_INVALIDATED: Duration = Duration::from_secs(24 * 3600);
const HIDDEN_USER_GRACE: Duration = Duration::from_secs(30 * 24 * 3600);
/// finAPI's documented limit of exchanges per process token.
const MAX_EXCHANGES: u32 = 10;

/// The table is at its configured bound even after sweeping expired entries.
#[derive(Debug)]
struct Full;

struct Slot<V> {
    value: V,
    expires_at: Option<Instant>,
}

/// A bounded map whose entries may expire.
///
/// Expiry times go into a queue in insertion order; most tables have one lifetime, so the queue
/// is (nearly) sorted and sweeping pops only its expired front. A queued time is never earlier than
/// its entry's real expiry, and reads treat expired entries as absent before they are swept.
struct ExpiringMap<K, V> {
    slots: HashMap<K, Slot<V>>,
    expiries: VecDeque<(Instant, K)>,
    capacity: usize,
}

impl<K: Clone + Eq + Hash, V> ExpiringMap<K, V> {
    fn new(capacity: usize) -> Self {
        Self {
            slots: HashMap::new(),
            expiries: VecDeque::new(),
            capacity,
        }
    }

    fn get<Q>(&self, key: &Q, now: Instant) -> Option<(&V, Option<Instant>)>
    where
        K: Borrow<Q>,
        Q: Eq + Hash + ?Sized,
    {
        self.slots
            .get(key)
            .filter(|slot| is_live(slot.expires_at, now))
            .map(|slot| (&slot.value, slot.expires_at))
    }

    fn get_mut<Q>(&mut self, key: &Q, now: Instant) -> Option<&mut Slot<V>>
    where
        K: Borrow<Q>,
        Q: Eq + Hash + ?Sized,
    {
        self.slots
            .get_mut(key)
            .filter(|slot| is_live(slot.expires_at, now))
    }

    /// Whether `count` new keys fit, after sweeping. When the queue's front is still live
    /// (tables holding client and user tokens mix two lifetimes, and an exchange shortens a
    /// user's), expired entries may sit behind it: then every entry is checked.
    fn has_room(&mut self, count: usize, now: Instant) -> bool {
        if self.slots.len() + count > self.capacity {
            self.sweep(now);
        }
        if self.slots.len() + count > self.capacity {
            self.slots.retain(|_, slot| is_live(slot.expires_at, now));
            self.expiries
                .retain(|(_, key)| self.slots.contains_key(key));
        }
        self.slots.len() + count <= self.capacity
    }

    fn insert(
        &mut self,
        key: K,
        value: V,
        expires_at: Option<Instant>,
        now: Instant,
    ) -> Result<(), Full> {
        if !self.slots.contains_key(&key) && !self.has_room(1, now) {
            return Err(Full);
        }
        if let Some(at) = expires_at {
            self.expiries.push_back((at, key.clone()));
            // Deleted entries leave their queue items behind; keep the queue near the map's size.
            if self.expiries.len() > 2 * self.slots.len() + 1024 {
                let slots = &self.slots;
                self.expiries.retain(|(queued, key)| {
                    slots
                        .get(key)
                        .and_then(|slot| slot.expires_at)
                        .is_some_and(|at| at <= *queued)
                });
            }
        }
        self.slots.insert(key, Slot { value, expires_at });
        Ok(())
    }

    fn live(&self, now: Instant) -> impl Iterator<Item = (&K, &V)> {
        self.slots
            .iter()
            .filter(move |(_, slot)| is_live(slot.expires_at, now))
            .map(|(key, slot)| (key, &slot.value))
    }

    fn remove<Q>(&mut self, key: &Q) -> Option<V>
    where
        K: Borrow<Q>,
        Q: Eq + Hash + ?Sized,
    {
        self.slots.remove(key).map(|slot| slot.value)
    }

    /// Drops expired entries and returns them.
    fn sweep(&mut self, now: Instant) -> Vec<(K, V)> {
        let mut expired = Vec::new();
        while let Some((at, _)) = self.expiries.front() {
            if *at > now {
                break;
            }
            let Some((_, key)) = self.expiries.pop_front() else {
                break;
            };
            if let MapEntry::Occupied(slot) = self.slots.entry(key)
                && !is_live(slot.get().expires_at, now)
            {
                let (key, slot) = slot.remove_entry();
                expired.push((key, slot.value));
            }
        }
        expired
    }

    fn clear(&mut self) {
        self.slots.clear();
        self.expiries.clear();
    }
}

fn is_live(expires_at: Option<Instant>, now: Instant) -> bool {
    expires_at.is_none_or(|at| at > now)
}

/// The end of a lifetime starting now; `Duration::ZERO` (or one too long to represent) never
/// ends.
fn deadline(now: Instant, ttl: Duration) -> Option<Instant> {
    if ttl.is_zero() {
        None
    } else {
        now.checked_add(ttl)
    }
}

/// `expires_in` as finAPI reports it: whole seconds left, rounded up so that a token that is
/// still valid never shows the `0` that means "never expires".
fn expires_in(expires_at: Option<Instant>, now: Instant) -> u64 {
    match expires_at {
        None => 0,
        Some(at) => {
            let left = at.saturating_duration_since(now);
            (left.as_secs() + u64::from(left.subsec_nanos() > 0)).max(1)
        }
    }
}

/// Who a bearer token stands for.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub(crate) enum Subject {
    Client(String),
    User { client_id: String, user_key: String },
}

/// The access token currently handed out for a client or a client+user pair; finAPI returns the
/// same token to the same credentials while it is valid.
type SessionKey = Subject;

struct User {
    id: String,
    password: String,
    email: Option<String>,
    phone: Option<String>,
    is_auto_update_enabled: bool,
    /// One refresh token per client; it lives as long as the user or until tokens are revoked.
    refresh_tokens: HashMap<String, String>,
}

impl User {
    fn to_wire(&self, password: &str) -> UserOut {
        UserOut {
            id: self.id.clone(),
            password: password.to_owned(),
            email: self.email.clone(),
            phone: self.phone.clone(),
            is_auto_update_enabled: self.is_auto_update_enabled,
        }
    }
}

struct Process {
    client_id: String,
    user_key: String,
    exchanges: u32,
    invalidated: bool,
}

struct Tables {
    access_tokens: ExpiringMap<String, Subject>,
    sessions: ExpiringMap<SessionKey, String>,
    refresh_tokens: ExpiringMap<String, Subject>,
    users: ExpiringMap<String, User>,
    processes: ExpiringMap<String, Process>,
}

/// An issued access token with what the token endpoint reports about it.
pub(crate) struct Issued {
    pub access_token: String,
    pub expires_in: u64,
    pub refresh_token: Option<String>,
}

/// Input of `POST /api/v2/users` after validation.
pub(crate) struct NewUser {
    pub id: Option<String>,
    pub password: Option<String>,
    pub email: Option<String>,
    pub phone: Option<String>,
    pub is_auto_update_enabled: bool,
}

/// The simulator's shared state: cheap to clone, one per simulator.
#[derive(Clone)]
pub struct SimState {
    inner: Arc<Inner>,
}

/// A known client: its secret and token lifetimes.
struct KnownClient {
    secret: String,
    client_token_ttl: Duration,
    user_token_ttl: Duration,
}

struct Inner {
    /// Client id to its secret and lifetimes; a secret changes through
    /// [`SimState::change_client_secret`].
    clients: RwLock<HashMap<String, KnownClient>>,
    client_token_ttl: Duration,
    user_token_ttl: Duration,
    process_token_ttl: Duration,
    tables: Mutex<Tables>,
    faults: Faults,
    stats: Counters,
    /// The calls of each caller-given request id.
    calls: CallLog,
    /// Connections and handshakes; `None` when serving plain HTTP, where nobody counts them.
    connections: Option<ConnectionCounters>,
    /// The `PSU-*` headers of the last calls.
    psu: PsuLog,
    recent_request_ids: Mutex<VecDeque<String>>,
}

/// How many caller-given request ids the simulator remembers for inspection.
const RECENT_REQUEST_IDS: usize = 1024;

impl SimState {
    /// State for `config`; faults in `config.faults` are active at once.
    pub fn new(config: &SimConfig) -> Self {
        let capacity = config.max_entries;
        Self {
            inner: Arc::new(Inner {
                clients: RwLock::new(
                    config
                        .clients
                        .iter()
                        .map(|c| {
                            let known = KnownClient {
                                secret: c.secret.clone(),
                                client_token_ttl: c
                                    .client_token_ttl
                                    .unwrap_or(config.client_token_ttl),
                                user_token_ttl: c.user_token_ttl.unwrap_or(config.user_token_ttl),
                            };
                            (c.id.clone(), known)
                        })
                        .collect(),
                ),
                client_token_ttl: config.client_token_ttl,
                user_token_ttl: config.user_token_ttl,
                process_token_ttl: config.process_token_ttl,
                tables: Mutex::new(Tables {
                    access_tokens: ExpiringMap::new(capacity),
                    sessions: ExpiringMap::new(capacity),
                    refresh_tokens: ExpiringMap::new(capacity),
                    users: ExpiringMap::new(capacity),
                    processes: ExpiringMap::new(capacity),
                }),
                faults: Faults::new(config.faults.clone()),
                stats: Counters::default(),
                calls: CallLog::default(),
                connections: config.tls.as_ref().map(|_| ConnectionCounters::default()),
                psu: PsuLog::default(),
                recent_request_ids: Mutex::new(VecDeque::with_capacity(RECENT_REQUEST_IDS)),
            }),
        }
    }

    pub(crate) fn faults(&self) -> &Faults {
        &self.inner.faults
    }

    pub(crate) fn counters(&self) -> &Counters {
        &self.inner.stats
    }

    pub(crate) fn call_log(&self) -> &CallLog {
        &self.inner.calls
    }

    /// The calls made under the caller-given request id `request_id` since start or the last
    /// reset, in the order they were answered: each as its endpoint key and outcome, as
    /// [`SimState::stats`] names them (`("POST /api/v2/users", "201")`, `"dropped"`). Only the
    /// newest [`super::CALL_LOG_REQUEST_IDS`] request ids are kept.
    pub fn calls_of(&self, request_id: &str) -> Vec<(String, String)> {
        self.inner.calls.calls_of(request_id)
    }

    pub(crate) fn psu_log(&self) -> &PsuLog {
        &self.inner.psu
    }

    /// The `PSU-*` headers of the last calls per endpoint, as `GET /__sim/psu` shows them.
    pub fn psu_headers(&self) -> PsuHeaders {
        self.inner.psu.snapshot()
    }

    fn tables(&self) -> MutexGuard<'_, Tables> {
        self.inner
            .tables
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// A snapshot of the counters.
    pub fn stats(&self) -> Stats {
        self.inner.stats.snapshot()
    }

    pub(crate) fn connection_counters(&self) -> Option<&ConnectionCounters> {
        self.inner.connections.as_ref()
    }

    /// Connections accepted and TLS handshakes completed since start or the last reset; `None`
    /// when serving plain HTTP.
    pub fn connection_stats(&self) -> Option<ConnectionStats> {
        self.inner
            .connections
            .as_ref()
            .map(ConnectionCounters::snapshot)
    }

    /// Sets all counters (calls and connections) back to zero and empties the call log.
    pub fn reset_stats(&self) {
        self.inner.stats.reset();
        self.inner.calls.reset();
        if let Some(connections) = &self.inner.connections {
            connections.reset();
        }
    }

    /// Adds a fault rule (unvalidated; see [`FaultRule::validate`]).
    pub fn add_fault(&self, rule: FaultRule) {
        self.inner.faults.add(rule);
    }

    /// Removes every fault rule.
    pub fn clear_faults(&self) {
        self.inner.faults.clear();
    }

    /// Invalidates every access and refresh token, as if finAPI had revoked them.
    pub fn revoke_all_tokens(&self) {
        let mut tables = self.tables();
        tables.access_tokens.clear();
        tables.sessions.clear();
        tables.refresh_tokens.clear();
    }

    /// Changes the secret of client `client_id` and revokes every access token it got with
    /// the client-credentials grant, as finAPI's `changeClientCredentials` does (finAPI
    /// reference, "Client secret rotation": user tokens stay valid). From then on the old
    /// secret gets `401 invalid_client`. Returns `false` for an unknown client.
    pub fn change_client_secret(&self, client_id: &str, secret: &str) -> bool {
        {
            let mut clients = self
                .inner
                .clients
                .write()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            match clients.get_mut(client_id) {
                Some(known) => known.secret = secret.to_owned(),
                None => return false,
            }
        }
        let subject = Subject::Client(client_id.to_owned());
        let mut tables = self.tables();
        let revoked: Vec<String> = tables
            .access_tokens
            .live(Instant::now())
            .filter(|(_, s)| **s == subject)
            .map(|(token, _)| token.clone())
            .collect();
        for token in revoked {
            tables.access_tokens.remove(&token);
        }
        tables.sessions.remove(&subject);
        true
    }

    fn clients(&self) -> std::sync::RwLockReadGuard<'_, HashMap<String, KnownClient>> {
        self.inner
            .clients
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Every live process: its token, how often it was exchanged, and whether an exchange
    /// invalidated it. For tests that check how a client used the Process Controller.
    pub fn process_exchanges(&self) -> Vec<(String, u32, bool)> {
        let tables = self.tables();
        tables
            .processes
            .live(Instant::now())
            .map(|(token, p)| (token.clone(), p.exchanges, p.invalidated))
            .collect()
    }

    /// Every live access token, split into client tokens and user tokens. For tests that look
    /// for tokens where they must not be.
    pub fn live_tokens(&self) -> (Vec<String>, Vec<String>) {
        let tables = self.tables();
        let (mut client, mut user) = (Vec::new(), Vec::new());
        for (token, subject) in tables.access_tokens.live(Instant::now()) {
            match subject {
                Subject::Client(_) => client.push(token.clone()),
                Subject::User { .. } => user.push(token.clone()),
            }
        }
        (client, user)
    }

    /// The password of every live user. For tests that look for passwords where they must not
    /// be.
    pub fn user_passwords(&self) -> Vec<String> {
        let tables = self.tables();
        tables
            .users
            .live(Instant::now())
            .map(|(_, user)| user.password.clone())
            .collect()
    }

    /// The last request ids that callers sent with finAPI calls (at most 1024), oldest first,
    /// remembered as the calls arrive.
    pub fn seen_request_ids(&self) -> Vec<String> {
        let ids = self
            .inner
            .recent_request_ids
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        ids.iter().cloned().collect()
    }

    pub(crate) fn remember_request_id(&self, id: &str) {
        let mut ids = self
            .inner
            .recent_request_ids
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if ids.len() == RECENT_REQUEST_IDS {
            ids.pop_front();
        }
        ids.push_back(id.to_owned());
    }

    /// Drops everything that has expired.
    pub fn sweep(&self) {
        let now = Instant::now();
        let mut tables = self.tables();
        tables.access_tokens.sweep(now);
        tables.sessions.sweep(now);
        tables.processes.sweep(now);
        for (key, user) in tables.users.sweep(now) {
            self.forget_tokens(&mut tables, &key, &user);
        }
    }

    /// The client id, if the credentials belong to a known client.
    pub(crate) fn authenticate_client(
        &self,
        client_id: Option<&str>,
        client_secret: Option<&str>,
    ) -> Result<String, ApiError> {
        match (client_id, client_secret) {
            (Some(id), Some(secret))
                if self
                    .clients()
                    .get(id)
                    .is_some_and(|known| known.secret == secret) =>
            {
                Ok(id.to_owned())
            }
            _ => Err(ApiError::invalid_client()),
        }
    }

    /// Who the bearer token stands for; 401 for an unknown, expired or revoked token and for a
    /// user token whose user is gone.
    pub(crate) fn authenticate_bearer(&self, token: &str) -> Result<Subject, ApiError> {
        let now = Instant::now();
        let tables = self.tables();
        let subject = tables
            .access_tokens
            .get(token, now)
            .map(|(subject, _)| subject.clone())
            .ok_or_else(|| ApiError::invalid_token("Invalid access token"))?;
        if let Subject::User { user_key, .. } = &subject
            && tables.users.get(user_key, now).is_none()
        {
            return Err(ApiError::invalid_token("Invalid access token"));
        }
        Ok(subject)
    }

    /// Creates one process, each with a hidden user, per client reference.
    pub(crate) fn create_processes(
        &self,
        client_id: &str,
        references: Vec<String>,
    ) -> Result<Vec<(String, String)>, ApiError> {
        let now = Instant::now();
        let process_deadline = deadline(now, self.inner.process_token_ttl);
        let user_deadline = process_deadline.and_then(|at| at.checked_add(HIDDEN_USER_GRACE));
        let mut created = Vec::with_capacity(references.len());
        let mut hidden = Vec::with_capacity(references.len());
        for reference in references {
            let user = User {
                id: uuid::Uuid::new_v4().to_string(),
                password: random_token(16)?,
                email: None,
                phone: None,
                is_auto_update_enabled: false,
                refresh_tokens: HashMap::new(),
            };
            created.push((reference, uuid::Uuid::new_v4().to_string()));
            hidden.push(user);
        }
        let mut tables = self.tables();
        if !tables.processes.has_room(created.len(), now)
            || !tables.users.has_room(hidden.len(), now)
        {
            return Err(full());
        }
        for ((_, process_token), user) in created.iter().zip(hidden) {
            let user_key = user.id.to_lowercase();
            let process = Process {
                client_id: client_id.to_owned(),
                user_key: user_key.clone(),
                exchanges: 0,
                invalidated: false,
            };
            tables
                .users
                .insert(user_key, user, user_deadline, now)
                .map_err(|Full| full())?;
            tables
                .processes
                .insert(process_token.clone(), process, process_deadline, now)
                .map_err(|Full| full())?;
        }
        Ok(created)
    }

    /// Exchanges a process token for its hidden user's access token.
    pub(crate) fn exchange(
        &self,
        process_token: &str,
        invalidate: bool,
    ) -> Result<String, ApiError> {
        let now = Instant::now();
        let refused = || ApiError::unknown_entity("Process token is unknown, used up or expired");
        let token = random_token(48)?;
        let mut tables = self.tables();
        let Tables {
            processes, users, ..
        } = &mut *tables;
        // A process whose hidden user was deleted has nothing left to hand out.
        let process = processes
            .get_mut(process_token, now)
            .filter(|slot| !slot.value.invalidated && slot.value.exchanges < MAX_EXCHANGES)
            .filter(|slot| users.get(&slot.value.user_key, now).is_some())
            .ok_or_else(refused)?;
        process.value.exchanges += 1;
        process.value.invalidated = invalidate;
        let subject = Subject::User {
            client_id: process.value.client_id.clone(),
            user_key: process.value.user_key.clone(),
        };
        if invalidate
            && let Subject::User { user_key, .. } = &subject
            && let Some(user) = tables.users.get_mut(user_key, now)
        {
            let soon = now.checked_add(HIDDEN_USER_GRACE_INVALIDATED);
            user.expires_at = match (user.expires_at, soon) {
                (Some(at), Some(soon)) => Some(at.min(soon)),
                (at, soon) => at.or(soon),
            };
        }
        let (access_token, _) = self.session_token(&mut tables, subject, token, now)?;
        Ok(access_token)
    }

    /// `grant_type=client_credentials`.
    pub(crate) fn client_token(&self, client_id: &str) -> Result<Issued, ApiError> {
        let now = Instant::now();
        let token = random_token(48)?;
        let mut tables = self.tables();
        let (access_token, expires_at) = self.session_token(
            &mut tables,
            Subject::Client(client_id.to_owned()),
            token,
            now,
        )?;
        Ok(Issued {
            access_token,
            expires_in: expires_in(expires_at, now),
            refresh_token: None,
        })
    }

    /// `grant_type=password`: the user's token and the client's refresh token for it.
    pub(crate) fn password_token(
        &self,
        client_id: &str,
        username: &str,
        password: &str,
    ) -> Result<Issued, ApiError> {
        let now = Instant::now();
        let bad_credentials = || ApiError::bad_request("Bad user credentials");
        let token = random_token(48)?;
        let new_refresh_token = random_token(48)?;
        let user_key = username.to_lowercase();
        let mut tables = self.tables();
        match tables.users.get(&user_key, now) {
            Some((user, _)) if user.password == password => {}
            _ => return Err(bad_credentials()),
        }
        let subject = Subject::User {
            client_id: client_id.to_owned(),
            user_key: user_key.clone(),
        };
        let existing = tables
            .users
            .get(&user_key, now)
            .and_then(|(user, _)| user.refresh_tokens.get(client_id).cloned())
            .filter(|refresh| tables.refresh_tokens.get(refresh, now).is_some());
        let refresh_token = match existing {
            Some(refresh) => refresh,
            None => {
                tables
                    .refresh_tokens
                    .insert(new_refresh_token.clone(), subject.clone(), None, now)
                    .map_err(|Full| full())?;
                if let Some(user) = tables.users.get_mut(&user_key, now) {
                    user.value
                        .refresh_tokens
                        .insert(client_id.to_owned(), new_refresh_token.clone());
                }
                new_refresh_token
            }
        };
        let (access_token, expires_at) = self.session_token(&mut tables, subject, token, now)?;
        Ok(Issued {
            access_token,
            expires_in: expires_in(expires_at, now),
            refresh_token: Some(refresh_token),
        })
    }

    /// `grant_type=refresh_token`: a user token for a refresh token issued to this client.
    pub(crate) fn refresh_token(
        &self,
        client_id: &str,
        refresh_token: &str,
    ) -> Result<Issued, ApiError> {
        let now = Instant::now();
        let token = random_token(48)?;
        let mut tables = self.tables();
        let subject = tables
            .refresh_tokens
            .get(refresh_token, now)
            .map(|(subject, _)| subject.clone())
            .filter(|subject| {
                matches!(subject, Subject::User { client_id: owner, user_key }
                if owner == client_id && tables.users.get(user_key, now).is_some())
            })
            .ok_or_else(|| ApiError::bad_request("Invalid refresh token"))?;
        let (access_token, expires_at) = self.session_token(&mut tables, subject, token, now)?;
        Ok(Issued {
            access_token,
            expires_in: expires_in(expires_at, now),
            refresh_token: None,
        })
    }

    /// The valid token of this session, or `fresh` registered as its new token.
    fn session_token(
        &self,
        tables: &mut Tables,
        subject: Subject,
        fresh: String,
        now: Instant,
    ) -> Result<(String, Option<Instant>), ApiError> {
        if let Some((token, expires_at)) = tables.sessions.get(&subject, now) {
            return Ok((token.clone(), expires_at));
        }
        let ttl = {
            let clients = self.clients();
            let client = match &subject {
                Subject::Client(id) | Subject::User { client_id: id, .. } => clients.get(id),
            };
            match subject {
                Subject::Client(_) => {
                    client.map_or(self.inner.client_token_ttl, |c| c.client_token_ttl)
                }
                Subject::User { .. } => {
                    client.map_or(self.inner.user_token_ttl, |c| c.user_token_ttl)
                }
            }
        };
        let expires_at = deadline(now, ttl);
        if !tables.access_tokens.has_room(1, now) || !tables.sessions.has_room(1, now) {
            return Err(full());
        }
        tables
            .access_tokens
            .insert(fresh.clone(), subject.clone(), expires_at, now)
            .map_err(|Full| full())?;
        tables
            .sessions
            .insert(subject, fresh.clone(), expires_at, now)
            .map_err(|Full| full())?;
        Ok((fresh, expires_at))
    }

    /// Creates a user; the answer carries the password in plain text.
    pub(crate) fn create_user(&self, new: NewUser) -> Result<UserOut, ApiError> {
        let now = Instant::now();
        let id = new.id.unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
        let password = match new.password {
            Some(password) => password,
            None => random_token(16)?,
        };
        let user = User {
            id,
            password,
            email: new.email,
            phone: new.phone,
            is_auto_update_enabled: new.is_auto_update_enabled,
            refresh_tokens: HashMap::new(),
        };
        let key = user.id.to_lowercase();
        let out = user.to_wire(&user.password);
        let mut tables = self.tables();
        if tables.users.get(&key, now).is_some() {
            return Err(ApiError::entity_exists(
                "A user with this id already exists",
            ));
        }
        tables
            .users
            .insert(key, user, None, now)
            .map_err(|Full| full())?;
        Ok(out)
    }

    /// The user with its password masked as finAPI does.
    pub(crate) fn get_user(&self, user_key: &str) -> Result<UserOut, ApiError> {
        let tables = self.tables();
        tables
            .users
            .get(user_key, Instant::now())
            .map(|(user, _)| user.to_wire("XXXXX"))
            .ok_or_else(|| ApiError::invalid_token("Invalid access token"))
    }

    /// Deletes the user and every token issued for it.
    pub(crate) fn delete_user(&self, user_key: &str) -> Result<(), ApiError> {
        let mut tables = self.tables();
        let user = tables
            .users
            .remove(user_key)
            .ok_or_else(|| ApiError::invalid_token("Invalid access token"))?;
        self.forget_tokens(&mut tables, user_key, &user);
        Ok(())
    }

    fn forget_tokens(&self, tables: &mut Tables, user_key: &str, user: &User) {
        for client_id in self.clients().keys() {
            let session = Subject::User {
                client_id: client_id.clone(),
                user_key: user_key.to_owned(),
            };
            if let Some(token) = tables.sessions.remove(&session) {
                tables.access_tokens.remove(&token);
            }
        }
        for refresh in user.refresh_tokens.values() {
            tables.refresh_tokens.remove(refresh);
        }
    }
}

fn full() -> ApiError {
    ApiError::unexpected("The simulator's tables are full")
}

/// `bytes` random bytes as lowercase hex: URL-safe, twice as many characters.
fn random_token(bytes: usize) -> Result<String, ApiError> {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut buffer = vec![0u8; bytes];
    getrandom::fill(&mut buffer).map_err(|_| ApiError::unexpected("No random source"))?;
    // One allocation per token: formatting each byte was the simulator's largest own cost.
    let mut token = String::with_capacity(2 * bytes);
    for byte in buffer {
        token.push(char::from(HEX[usize::from(byte >> 4)]));
        token.push(char::from(HEX[usize::from(byte & 0x0f)]));
    }
    Ok(token)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expired_entries_are_swept_and_free_room() {
        let now = Instant::now();
        let mut map = ExpiringMap::new(2);
        map.insert(1, "a", Some(now + Duration::from_secs(1)), now)
            .unwrap();
        map.insert(2, "b", None, now).unwrap();
        assert!(map.insert(3, "c", None, now).is_err());
        let later = now + Duration::from_secs(2);
        assert!(map.get(&1, later).is_none());
        map.insert(3, "c", None, later).unwrap();
        assert_eq!(map.slots.len(), 2);
    }

    #[test]
    fn expired_entries_behind_a_longer_lived_one_free_room_too() {
        let now = Instant::now();
        let mut map = ExpiringMap::new(2);
        // A long-lived entry at the queue's front, a short-lived one behind it.
        map.insert(1, "client", Some(now + Duration::from_secs(3600)), now)
            .unwrap();
        map.insert(2, "user", Some(now + Duration::from_secs(1)), now)
            .unwrap();
        let later = now + Duration::from_secs(2);
        map.insert(3, "user", Some(later + Duration::from_secs(1)), later)
            .unwrap();
        assert!(map.get(&1, later).is_some());
        assert_eq!(map.slots.len(), 2);
        assert_eq!(map.expiries.len(), 2);
    }

    #[test]
    fn random_tokens_are_lowercase_hex_of_twice_the_length() {
        let token = random_token(48).unwrap();
        assert_eq!(token.len(), 96);
        assert!(
            token
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        );
        assert_ne!(token, random_token(48).unwrap());
    }

    #[test]
    fn expires_in_rounds_up_and_zero_means_never() {
        let now = Instant::now();
        assert_eq!(expires_in(None, now), 0);
        assert_eq!(expires_in(Some(now + Duration::from_millis(1)), now), 1);
        assert_eq!(
            expires_in(Some(now + Duration::from_millis(3_599_500)), now),
            3600
        );
        assert_eq!(expires_in(Some(now), now), 1);
    }
}
