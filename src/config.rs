//! Layered configuration, merged by figment: the built-in `config/default.toml`, then an
//! optional file given with `--config`, then environment variables
//! `GIROIDENT_BROKER_<SECTION>__<KEY>` (`__` separates the levels). Loaded and validated once,
//! before any port is bound; every problem is reported at once with its key.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use figment::error::Kind;
use figment::providers::{Format, Serialized, Toml};
use figment::value::{Dict, Value};
use figment::{Figment, Profile, Provider};
use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;

/// The defaults compiled into the binary, so that it runs from any working directory.
pub const DEFAULT_TOML: &str = include_str!("../config/default.toml");

/// Prefix of the environment variables that override configuration keys. Sections and keys are
/// separated by a double underscore: `GIROIDENT_BROKER_FINAPI__CLIENT_ID` sets `finapi.client_id`.
pub const ENV_PREFIX: &str = "GIROIDENT_BROKER_";

/// The whole configuration of the broker.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    /// The broker's own HTTP listener.
    pub server: ServerSettings,
    /// The admin listener: metrics and health, never exposed through the gateway.
    pub admin: AdminSettings,
    /// Who may call the broker.
    pub auth: AuthSettings,
    /// Limits on requests.
    pub limits: LimitsSettings,
    /// How to reach finAPI and with which client.
    pub finapi: FinapiSettings,
    /// Choices of the GiroIdent flows.
    pub flows: FlowSettings,
    /// The client-token cache.
    pub token_cache: TokenCacheSettings,
    /// Logging.
    pub log: LogSettings,
    /// Retries, time budgets and circuit breakers around finAPI calls.
    pub resilience: ResilienceSettings,
    /// The ledger of managed finAPI identities.
    pub identities: IdentitiesSettings,
    /// Distributed tracing: OTLP export and W3C trace context.
    pub tracing: TracingSettings,
}

/// Distributed tracing (OpenTelemetry). Each key has a standard OpenTelemetry variable that
/// wins over it (the OpenTelemetry specification lets the environment configure the SDK):
/// `OTEL_EXPORTER_OTLP_ENDPOINT`, `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`, `OTEL_SERVICE_NAME`,
/// `OTEL_TRACES_SAMPLER`, `OTEL_TRACES_SAMPLER_ARG`, `OTEL_EXPORTER_OTLP_HEADERS`,
/// `OTEL_EXPORTER_OTLP_TIMEOUT`, `OTEL_BSP_MAX_QUEUE_SIZE`; `OTEL_SDK_DISABLED=true` turns
/// export off. Without an endpoint nothing is exported and no tracer is installed.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TracingSettings {
    /// Base URL of an OTLP/HTTP collector (e.g. `http://otel-collector:4318`); traces go to
    /// its `/v1/traces`. Empty: no export.
    pub endpoint: String,
    /// Full URL traces are sent to, used as it is; wins over `endpoint`.
    pub traces_endpoint: String,
    /// `service.name` of the exported spans.
    pub service_name: String,
    /// `always_on`, `always_off`, `traceidratio`, `parentbased_always_on`,
    /// `parentbased_always_off` or `parentbased_traceidratio` (OpenTelemetry's sampler names).
    pub sampler: String,
    /// The ratio (0 to 1) of the `*traceidratio` samplers.
    pub sampler_arg: f64,
    /// Headers sent to the collector, `key=value` pairs separated by commas (W3C Baggage
    /// format, as `OTEL_EXPORTER_OTLP_HEADERS`), e.g. an API key: a secret, never logged.
    pub headers: SecretString,
    /// Milliseconds one export may take before its spans are dropped.
    pub timeout_ms: u64,
    /// Finished spans waiting for export, at most; spans beyond are dropped and counted in
    /// `broker_trace_spans_dropped_total`, so that a slow collector never holds a request.
    pub max_queue_size: usize,
    /// Send `traceparent` (and `tracestate`) to finAPI. Off by default: trace ids would reach
    /// a third party.
    pub propagate_to_finapi: bool,
}

/// An OpenTelemetry sampler, by its standard name (`OTEL_TRACES_SAMPLER`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum TraceSampler {
    /// `always_on`.
    AlwaysOn,
    /// `always_off`.
    AlwaysOff,
    /// `traceidratio`, with the ratio.
    TraceIdRatio(f64),
    /// `parentbased_always_on` (the default): the caller's decision, else on.
    ParentBasedAlwaysOn,
    /// `parentbased_always_off`.
    ParentBasedAlwaysOff,
    /// `parentbased_traceidratio`, with the ratio.
    ParentBasedTraceIdRatio(f64),
}

impl TracingSettings {
    /// The URL spans are sent to, `None` when export is off (no endpoint configured).
    pub fn traces_url(&self) -> Option<String> {
        if !self.traces_endpoint.is_empty() {
            Some(self.traces_endpoint.clone())
        } else if !self.endpoint.is_empty() {
            Some(format!("{}/v1/traces", self.endpoint.trim_end_matches('/')))
        } else {
            None
        }
    }

    /// The sampler the settings name (checked at load).
    pub fn sampler(&self) -> Option<TraceSampler> {
        let ratio = self.sampler_arg;
        Some(match self.sampler.as_str() {
            "always_on" => TraceSampler::AlwaysOn,
            "always_off" => TraceSampler::AlwaysOff,
            "traceidratio" => TraceSampler::TraceIdRatio(ratio),
            "parentbased_always_on" => TraceSampler::ParentBasedAlwaysOn,
            "parentbased_always_off" => TraceSampler::ParentBasedAlwaysOff,
            "parentbased_traceidratio" => TraceSampler::ParentBasedTraceIdRatio(ratio),
            _ => return None,
        })
    }

    /// The collector headers as `(name, value)` pairs; `Err` names the first bad pair by its
    /// position only (a value may be a secret).
    pub fn header_pairs(&self) -> Result<Vec<(String, String)>, String> {
        let raw = self.headers.expose_secret();
        let mut pairs = Vec::new();
        for (n, item) in raw.split(',').enumerate() {
            if item.trim().is_empty() {
                continue;
            }
            let bad = || format!("pair {} is not key=value with a valid header name", n + 1);
            let (key, value) = item.split_once('=').ok_or_else(bad)?;
            let key = key.trim();
            let value = value.trim();
            let value = percent_decode(value).ok_or_else(bad)?;
            if key.is_empty()
                || !key
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
                || value.chars().any(char::is_control)
            {
                return Err(bad());
            }
            pairs.push((key.to_ascii_lowercase(), value));
        }
        Ok(pairs)
    }

    /// Overlays the standard OpenTelemetry variables (an empty one counts as unset, as the
    /// specification says) and checks every value.
    fn resolve(
        &mut self,
        env: &dyn Fn(&str) -> Option<String>,
        problem: &mut impl FnMut(&str, String),
    ) {
        let var = |name: &str| env(name).filter(|v| !v.trim().is_empty());
        if let Some(v) = var("OTEL_EXPORTER_OTLP_ENDPOINT") {
            self.endpoint = v;
        }
        if let Some(v) = var("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") {
            self.traces_endpoint = v;
        }
        if let Some(v) = var("OTEL_SERVICE_NAME") {
            self.service_name = v;
        }
        if let Some(v) = var("OTEL_TRACES_SAMPLER") {
            self.sampler = v.trim().to_ascii_lowercase();
        }
        if let Some(v) = var("OTEL_TRACES_SAMPLER_ARG") {
            match v.trim().parse::<f64>() {
                Ok(ratio) => self.sampler_arg = ratio,
                Err(_) => problem("OTEL_TRACES_SAMPLER_ARG", format!("{v:?} is not a number")),
            }
        }
        if let Some(v) = var("OTEL_EXPORTER_OTLP_HEADERS") {
            self.headers = SecretString::from(v);
        }
        if let Some(v) = var("OTEL_EXPORTER_OTLP_TIMEOUT") {
            match v.trim().parse::<u64>() {
                Ok(ms) => self.timeout_ms = ms,
                Err(_) => problem(
                    "OTEL_EXPORTER_OTLP_TIMEOUT",
                    format!("{v:?} is not a whole number of milliseconds"),
                ),
            }
        }
        if let Some(v) = var("OTEL_BSP_MAX_QUEUE_SIZE") {
            match v.trim().parse::<usize>() {
                Ok(n) => self.max_queue_size = n,
                Err(_) => problem("OTEL_BSP_MAX_QUEUE_SIZE", format!("{v:?} is not a number")),
            }
        }
        if var("OTEL_SDK_DISABLED").is_some_and(|v| v.trim().eq_ignore_ascii_case("true")) {
            self.endpoint.clear();
            self.traces_endpoint.clear();
        }

        for (key, url) in [
            ("tracing.endpoint", &self.endpoint),
            ("tracing.traces_endpoint", &self.traces_endpoint),
        ] {
            if url.is_empty() {
                continue;
            }
            match reqwest::Url::parse(url) {
                Ok(u) if matches!(u.scheme(), "http" | "https") && u.host_str().is_some() => {
                    if !u.username().is_empty() || u.password().is_some() {
                        problem(
                            key,
                            "must not carry credentials (use tracing.headers)".into(),
                        );
                    }
                }
                _ => problem(key, format!("{url:?} is not an http(s) URL")),
            }
        }
        if self.service_name.trim().is_empty() {
            problem("tracing.service_name", "must be set".into());
        }
        if self.sampler().is_none() {
            problem(
                "tracing.sampler",
                format!(
                    "{:?} is not a sampler: use always_on, always_off, traceidratio, \
                     parentbased_always_on, parentbased_always_off or parentbased_traceidratio",
                    self.sampler
                ),
            );
        }
        if !(0.0..=1.0).contains(&self.sampler_arg) {
            problem("tracing.sampler_arg", "must be between 0 and 1".into());
        }
        if let Err(msg) = self.header_pairs() {
            problem("tracing.headers", msg);
        }
        if self.timeout_ms == 0 {
            problem("tracing.timeout_ms", "must be at least 1".into());
        }
        if !(1..=1_000_000).contains(&self.max_queue_size) {
            problem(
                "tracing.max_queue_size",
                "must be between 1 and 1000000".into(),
            );
        }
    }
}

/// Decodes `%XX` escapes (the W3C Baggage format of `OTEL_EXPORTER_OTLP_HEADERS`); `None` for
/// a broken escape or a result that is not UTF-8.
fn percent_decode(value: &str) -> Option<String> {
    let bytes = value.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = value.get(i + 1..i + 3)?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// The ledger of the finAPI users the access flow creates, their derived passwords and their
/// deletion.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IdentitiesSettings {
    /// The ledger's database: `sqlite://PATH` (embedded, created if missing; enough for one
    /// replica with a persistent volume) or `postgres://USER:PASSWORD@HOST/DB` (several
    /// replicas). Treated as a secret: a PostgreSQL URL may hold a password.
    pub database_url: SecretString,
    /// A file holding the database URL (a Docker or Kubernetes secret, since a PostgreSQL URL
    /// holds its password); one trailing newline is ignored. When set, it replaces
    /// `database_url`, which must then be left at its default.
    #[serde(default)]
    pub database_url_file: Option<PathBuf>,
    /// Connections the broker keeps to the database at most.
    pub database_max_connections: u32,
    /// How a SQLite ledger's write-ahead log reaches the disk (PostgreSQL ignores it; its
    /// commits are flushed with `synchronous_commit`, on by default). `full` (the default)
    /// syncs the log at every commit: a committed write, and with it every intent written
    /// before `POST /api/v2/users`, survives an OS crash or power loss. `normal` syncs only at
    /// the checkpoints (every second): commits cost no fsync, a committed write survives the
    /// broker's crash, but an OS crash or power loss can lose the commits since the last
    /// checkpoint, and with them the record of finAPI users created then
    /// (sqlite.org/pragma.html#pragma_synchronous). `intents` syncs the commits that hold an
    /// intent and leaves the others (activations, reuses, events) to the next synced commit or
    /// checkpoint: the record of every finAPI user survives power loss, but an activation lost
    /// with it turns the user back into an orphan, which the reaper deletes before the
    /// `deleteAfter` its caller was told (README "Durability").
    pub sqlite_synchronous: String,
    /// The key user passwords are derived from (HMAC-SHA256, at least 32 bytes). Set it only
    /// through the environment (`GIROIDENT_BROKER_IDENTITIES__PASSWORD_KEY`), or use
    /// `password_key_file`.
    #[serde(default)]
    pub password_key: Option<SecretString>,
    /// A file holding the password key; one trailing newline is ignored.
    #[serde(default)]
    pub password_key_file: Option<PathBuf>,
    /// Files holding earlier password keys, kept while identities made with them live.
    pub previous_password_key_files: Vec<PathBuf>,
    /// Seconds from an identity's last session to its deletion (callers may override it). Must
    /// outlast the GiroIdent check: finAPI forbids deleting a user before its final result.
    pub retention_secs: u64,
    /// Seconds between two runs of the reaper, which deletes due identities.
    pub reaper_interval_secs: u64,
    /// Seconds after which an identity whose creation nobody completed is resolved by the
    /// reaper; longer than any request (`server.request_timeout_secs`), so that no lost call
    /// can still create the user.
    pub orphan_min_age_secs: u64,
    /// Most intents of one (caller, finAPI client) written ahead of time for sessions without
    /// a `clientReference` (reserved intents: README "Managed identities"); `0` writes every
    /// intent in its own session. At most 128 (one group commit of the ledger's writer).
    pub reserved_intents: u64,
    /// The earlier password keys, read from `previous_password_key_files`.
    #[serde(skip)]
    pub previous_password_keys: Vec<SecretString>,
}

/// The broker's own HTTP listener.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerSettings {
    /// Address and port the broker listens on (`0.0.0.0:8080` in the container).
    pub listen: String,
    /// Seconds the broker keeps serving after SIGTERM while `/readyz` already answers 503, so
    /// that load balancers stop sending traffic before the listener closes.
    pub drain_secs: u64,
    /// Upper bound in seconds for handling one request, upstream calls included.
    pub request_timeout_secs: u64,
    /// Threads of the async runtime: `1` runs the broker on one thread, the least CPU per
    /// session (scale out with replicas); `0` one per CPU core; `N` that many.
    pub worker_threads: u64,
}

/// The admin listener.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminSettings {
    /// Address and port of `/metrics`, `/livez` and `/readyz` for Prometheus and probes; keep
    /// it off the gateway (loopback by default).
    pub listen: String,
}

/// Who may call the broker.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthSettings {
    /// Let every request in without an API key (as caller `anonymous`, all flows). For local
    /// experiments only; a warning is logged at start.
    pub disabled: bool,
    /// The callers, as `[[auth.callers]]` tables in a `--config` file (or TOML in
    /// `GIROIDENT_BROKER_AUTH__CALLERS`).
    pub callers: Vec<CallerSettings>,
}

/// One caller of the broker (a backend) and its API key.
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CallerSettings {
    /// Name in logs and metrics: 1 to 64 characters of `A-Z a-z 0-9 - _ .`.
    pub name: String,
    /// SHA-256 of the API key, 64 hex digits, so the configuration never holds the key.
    #[serde(default)]
    pub key_sha256: Option<String>,
    /// A file holding the API key (a Docker or Kubernetes secret).
    #[serde(default)]
    pub key_file: Option<PathBuf>,
    /// The name of an environment variable holding the API key.
    #[serde(default)]
    pub key_env: Option<String>,
    /// Flows this caller may start: `standalone`, `access`.
    pub flows: Vec<String>,
    /// Requests per second for this caller, instead of `limits.caller_rate_per_sec`.
    #[serde(default)]
    pub rate_per_sec: Option<u64>,
    /// Burst for this caller, instead of `limits.caller_burst`.
    #[serde(default)]
    pub burst: Option<u64>,
    /// Seconds from an identity's last session to its deletion for this caller, instead of
    /// `identities.retention_secs`.
    #[serde(default)]
    pub retention_secs: Option<u64>,
    /// The finAPI clients this caller may use, its default first; absent: `["default"]`
    /// (which must then exist).
    #[serde(default)]
    pub finapi_clients: Option<Vec<String>>,
    /// SHA-256 of the key, resolved from whichever source is configured.
    #[serde(skip)]
    key_digest: Option<[u8; 32]>,
}

impl fmt::Debug for CallerSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CallerSettings")
            .field("name", &self.name)
            .field("flows", &self.flows)
            .field("finapi_clients", &self.finapi_clients)
            .field("key", &"[REDACTED]")
            .finish()
    }
}

impl CallerSettings {
    /// A caller built in code (tests, tools), holding only the digest of `key`.
    pub fn from_key(name: &str, key: &[u8], flows: &[FlowKind]) -> Self {
        let digest = sha256(key);
        Self {
            name: name.to_owned(),
            key_sha256: Some(to_hex(&digest)),
            key_file: None,
            key_env: None,
            flows: flows.iter().map(|f| f.as_str().to_owned()).collect(),
            rate_per_sec: None,
            burst: None,
            retention_secs: None,
            finapi_clients: None,
            key_digest: Some(digest),
        }
    }

    /// SHA-256 of the caller's API key (set once the settings are validated).
    pub fn key_digest(&self) -> Option<[u8; 32]> {
        self.key_digest
    }

    /// The finAPI clients this caller may use, its default first.
    pub fn finapi_client_names(&self) -> Vec<String> {
        self.finapi_clients
            .clone()
            .unwrap_or_else(|| vec![DEFAULT_CLIENT.to_owned()])
    }

    /// The flows this caller may start (validated names only).
    pub fn flow_kinds(&self) -> Vec<FlowKind> {
        self.flows
            .iter()
            .filter_map(|f| FlowKind::parse(f))
            .collect()
    }
}

/// Limits on requests.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsSettings {
    /// Largest accepted request body in bytes (413 beyond).
    pub max_body_bytes: u64,
    /// Seconds a client may take to send the request headers, and again to send the body.
    pub read_timeout_secs: u64,
    /// Requests handled at once; beyond it new requests get 503 at once (load shedding).
    pub max_in_flight: u64,
    /// Requests per second each caller may make on average (token-bucket refill rate).
    pub caller_rate_per_sec: u64,
    /// Requests each caller may make in a burst (token-bucket size).
    pub caller_burst: u64,
}

/// How to reach finAPI and with which client.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FinapiSettings {
    /// Base URL of finAPI Access (OAuth tokens and users).
    pub access_url: String,
    /// Base URL of the finAPI Process Controller (standalone GiroIdent processes).
    pub process_controller_url: String,
    /// The finAPI client id.
    pub client_id: String,
    /// The finAPI client secret. Set it only through the environment
    /// (`GIROIDENT_BROKER_FINAPI__CLIENT_SECRET`), or use `client_secret_file`.
    #[serde(default)]
    pub client_secret: Option<SecretString>,
    /// A file holding the finAPI client secret (a Docker or Kubernetes secret); one trailing
    /// newline is ignored.
    #[serde(default)]
    pub client_secret_file: Option<PathBuf>,
    /// A PEM bundle of CA certificates trusted for finAPI's HTTPS in addition to the system's
    /// roots (a private CA, or the simulator's). Verification itself cannot be turned off.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// Allow `http://` upstream URLs. Only for tests against the plain-HTTP simulator; no
    /// shipped configuration sets it.
    pub allow_insecure_http: bool,
    /// Offer HTTP/2 to finAPI by ALPN (RFC 7301; HTTP/1.1 when finAPI does not take it). Off
    /// by default: all calls to a host then share one connection, and the server's limit on
    /// concurrent streams (RFC 9113 section 5.1.2; 128 at common load balancers) caps the calls
    /// in flight, hence sessions per second at `limit / latency`, below what the CPU allows
    /// once finAPI is far away (see the README, "finAPI far away").
    pub http2: bool,
    /// Milliseconds to wait for a TCP (and TLS) connection to finAPI.
    pub connect_timeout_ms: u64,
    /// Milliseconds to wait for one finAPI call to answer completely.
    pub request_timeout_ms: u64,
    /// Named finAPI clients, as `[finapi.clients.NAME]` tables (finAPI issues one app client
    /// per product and environment). The single-client keys above, when set, are the client
    /// named `default`.
    #[serde(default)]
    pub clients: BTreeMap<String, FinapiClientSettings>,
}

/// One named finAPI client: `[finapi.clients.NAME]`. NAME is 1 to 64 characters of
/// `A-Z a-z 0-9 - _ .` (as caller names); to set its secret through the environment
/// (`GIROIDENT_BROKER_FINAPI__CLIENTS__NAME__CLIENT_SECRET`, read in lower case), NAME must be
/// lower case without `.`.
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FinapiClientSettings {
    /// The finAPI client id.
    pub client_id: String,
    /// The client secret: only through the environment
    /// (`GIROIDENT_BROKER_FINAPI__CLIENTS__NAME__CLIENT_SECRET`), or use `client_secret_file`.
    #[serde(default)]
    pub client_secret: Option<SecretString>,
    /// A file holding the client secret; one trailing newline is ignored.
    #[serde(default)]
    pub client_secret_file: Option<PathBuf>,
    /// Base URL of this client's finAPI Access.
    pub access_url: String,
    /// Base URL of this client's finAPI Process Controller.
    pub process_controller_url: String,
    /// `processId` sent to the Process Controller; `flows.process_id` when absent.
    #[serde(default)]
    pub process_id: Option<String>,
    /// A PEM bundle of certificate authorities trusted for this client's hosts, besides the
    /// system's roots.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
}

impl fmt::Debug for FinapiClientSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FinapiClientSettings")
            .field("client_id", &self.client_id)
            .field("client_secret", &"[REDACTED]")
            .field("access_url", &self.access_url)
            .field("process_controller_url", &self.process_controller_url)
            .field("process_id", &self.process_id)
            .field("ca_file", &self.ca_file)
            .finish()
    }
}

/// The name of the client the single-client keys (`finapi.client_id`, …) configure.
pub const DEFAULT_CLIENT: &str = "default";

/// One finAPI client, resolved from its table or from the single-client keys: what the
/// broker's upstream clients are built from.
#[derive(Debug, Clone)]
pub struct FinapiClientConfig {
    /// The client's name (`default` for the single-client keys).
    pub name: String,
    /// The finAPI client id.
    pub client_id: String,
    /// The finAPI client secret.
    pub client_secret: SecretString,
    /// The file the secret was read from, if any: re-read on `SIGHUP` and after finAPI
    /// refuses the secret (`invalid_client`).
    pub client_secret_file: Option<PathBuf>,
    /// Base URL of finAPI Access.
    pub access_url: String,
    /// Base URL of the Process Controller.
    pub process_controller_url: String,
    /// `processId` sent to the Process Controller.
    pub process_id: String,
    /// Extra trusted certificate authorities (PEM), if any.
    pub ca_file: Option<PathBuf>,
}

impl FinapiSettings {
    /// Whether the single-client keys configure the client `default`: when they are set, or
    /// when no `[finapi.clients.NAME]` table exists (they are then required).
    pub fn has_single_client(&self) -> bool {
        self.clients.is_empty()
            || !self.client_id.is_empty()
            || self.client_secret.is_some()
            || self.client_secret_file.is_some()
    }

    /// The names of the configured clients, `default` first when it exists.
    pub fn client_names(&self) -> Vec<String> {
        let single = self.has_single_client();
        let mut names = Vec::new();
        if single {
            names.push(DEFAULT_CLIENT.to_owned());
        }
        names.extend(
            self.clients
                .keys()
                .filter(|n| !(single && n.as_str() == DEFAULT_CLIENT))
                .cloned(),
        );
        names
    }
}

/// Choices of the GiroIdent flows.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FlowSettings {
    /// Flow used when a request names none: `standalone` or `access`.
    pub default_flow: String,
    /// `processId` sent to the Process Controller (`GIROIDENT` or `USER_ONLY`).
    pub process_id: String,
    /// Exchange the process token with `invalidate=true`, so that it cannot be used again.
    pub invalidate_process_token: bool,
}

/// The client-token cache.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenCacheSettings {
    /// Seconds before a client token's expiry at which a request reading it starts a
    /// background refresh (half of its life for tokens shorter than twice this); see the README
    /// for why finAPI's "same token while valid" rule makes the refresh end at expiry.
    pub refresh_ahead_secs: u64,
}

/// Logging.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogSettings {
    /// `auto` (JSON lines unless standard error is a terminal), `json` or `pretty`.
    pub format: String,
    /// Filter in `RUST_LOG` syntax; `RUST_LOG` itself, when set, wins.
    pub filter: String,
}

/// Retries, time budgets and circuit breakers around finAPI calls.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ResilienceSettings {
    /// Attempts of one finAPI call, the first included, where a retry is safe (the process
    /// token exchange is never retried).
    pub max_attempts: u32,
    /// Milliseconds: upper bound of the first backoff; each further one doubles it (full
    /// jitter: the wait is uniform between 0 and the bound).
    pub base_backoff_ms: u64,
    /// Milliseconds: upper bound of any backoff.
    pub max_backoff_ms: u64,
    /// Milliseconds: the longest finAPI `Retry-After` the broker waits out before a retry; a
    /// longer one ends the session at once with `503` and that `Retry-After`.
    pub max_retry_after_ms: u64,
    /// Milliseconds: total time budget of one KYC session, retries and waits included. A retry
    /// is only started when a whole `finapi.request_timeout_ms` still fits into it.
    pub session_budget_ms: u64,
    /// Failures in a row (connect errors, timeouts, broken connections, 5xx, 429) that open
    /// the circuit breaker of an upstream service.
    pub breaker_failure_threshold: u32,
    /// Milliseconds an open breaker refuses calls before it lets one probe through.
    pub breaker_cooldown_ms: u64,
}

/// A configuration that could not be loaded: every problem found, each with its key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// `(key, problem)` pairs, in the order they were found.
    pub problems: Vec<(String, String)>,
}

impl ConfigError {
    pub fn single(key: impl Into<String>, problem: impl Into<String>) -> Self {
        Self {
            problems: vec![(key.into(), problem.into())],
        }
    }

    /// Whether any problem names this key.
    pub fn mentions(&self, key: &str) -> bool {
        self.problems.iter().any(|(k, _)| k == key)
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "invalid configuration:")?;
        for (key, problem) in &self.problems {
            write!(f, "\n  {key}: {problem}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigError {}

/// Which flow a KYC session runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum FlowKind {
    /// Process Controller: process token exchanged for a user token.
    Standalone,
    /// Access: a new finAPI user and its token.
    Access,
}

impl FlowKind {
    /// The name used in requests, responses and configuration.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Standalone => "standalone",
            Self::Access => "access",
        }
    }

    fn parse(s: &str) -> Option<Self> {
        match s {
            "standalone" => Some(Self::Standalone),
            "access" => Some(Self::Access),
            _ => None,
        }
    }
}

impl<'de> Deserialize<'de> for FlowKind {
    // By hand, because serde_json reports a derived enum given a number as a syntax error.
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let name = String::deserialize(deserializer)?;
        Self::parse(&name)
            .ok_or_else(|| serde::de::Error::unknown_variant(&name, &["standalone", "access"]))
    }
}

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    /// JSON lines unless standard error is a terminal.
    Auto,
    /// JSON lines.
    Json,
    /// Human-readable lines.
    Pretty,
}

impl Settings {
    /// Loads the built-in defaults, then `file` if given, then the process environment.
    pub fn load(file: Option<&Path>) -> Result<Self, ConfigError> {
        Self::load_with_env(file, std::env::vars())
    }

    /// Like [`Settings::load`], with the environment given explicitly (for tests).
    pub fn load_with_env(
        file: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Self, ConfigError> {
        Self::load_layered(std::iter::empty(), file, env)
    }

    /// Loads the built-in defaults, then `preset`, then `file` if given, then the environment:
    /// each layer overrides the ones before it, and every problem of every layer is reported
    /// at once. `preset` holds `(key, value)` pairs such as `("server.listen", "127.0.0.1:0")`,
    /// each value read as its key's type like an environment variable's; the demo puts its own
    /// settings there, so that a `--config` file and the environment still apply over them.
    ///
    /// `client_secret` and `client_secret_file` (of `finapi` and of each `finapi.clients.NAME`)
    /// are one setting in two forms: a file or environment that sets either replaces both of
    /// the preset's.
    ///
    /// figment merges the layers; values are checked once, on the merged result, by
    /// `extract_all`, which reports every wrong key and type at once and never a value.
    pub fn load_layered(
        preset: impl IntoIterator<Item = (String, String)>,
        file: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Self, ConfigError> {
        let mut problems = Vec::new();
        let mut sources = Vec::new();
        let defaults = default_dict()?;
        let mut preset = text_layer(
            &defaults,
            preset
                .into_iter()
                .map(|(key, value)| (key, "preset".to_owned(), value)),
            &mut sources,
            &mut problems,
        );
        let mut file_table = Table::new();
        if let Some(path) = file {
            let text = std::fs::read_to_string(path).map_err(|e| {
                ConfigError::single(
                    "--config",
                    format!("cannot read {}: {}", path.display(), e.kind()),
                )
            })?;
            // toml's own message quotes the offending line, which may hold a secret: name only
            // the place and the kind of mistake.
            file_table = text.parse().map_err(|e: toml::de::Error| {
                let line = e
                    .span()
                    .map_or(0, |span| text[..span.start].matches('\n').count() + 1);
                ConfigError::single(
                    "--config",
                    format!("{} line {line}: {}", path.display(), e.message()),
                )
            })?;
            refuse_file_secrets(&mut file_table, "", &mut problems);
        }
        let env: Vec<(String, String)> = env.into_iter().collect();
        let mut env_table = text_layer(
            &defaults,
            env.iter().filter_map(|(name, value)| {
                let key = name
                    .strip_prefix(ENV_PREFIX)?
                    .to_ascii_lowercase()
                    .replace("__", ".");
                Some((key, name.clone(), value.clone()))
            }),
            &mut sources,
            &mut problems,
        );
        drop_replaced_preset_secrets(&mut preset, &mut [&mut file_table, &mut env_table]);
        // Later sources win; keys are checked once, on the merged value.
        let data = Figment::from(Toml::string(DEFAULT_TOML))
            .merge(Serialized::defaults(preset))
            .merge(Serialized::defaults(file_table))
            .merge(Serialized::defaults(env_table))
            .data()
            .map(|mut profiles| profiles.remove(&Profile::Default).unwrap_or_default())
            .map_err(|e| ConfigError::single("(config)", e.to_string()))?;
        let Some(mut settings) = extract_all(data, &defaults, &sources, &mut problems) else {
            return Err(ConfigError { problems });
        };
        let lookup = |name: &str| env.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone());
        if let Err(found) = settings.resolve_and_validate(&lookup) {
            // A value that failed to load was replaced by its default: only new keys count.
            for (key, problem) in found.problems {
                if !problems.iter().any(|(k, _)| *k == key) {
                    problems.push((key, problem));
                }
            }
        }
        if problems.is_empty() {
            Ok(settings)
        } else {
            Err(ConfigError { problems })
        }
    }

    /// Loads the built-in defaults only (the starting point of the demo and of tests).
    pub fn defaults() -> Result<Self, ConfigError> {
        Self::load_with_env(None, std::iter::empty())
    }

    /// Reads the secret files and variables, if configured, and checks every value.
    fn resolve_and_validate(
        &mut self,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<(), ConfigError> {
        let mut problems = self.resolve_callers(env);
        let mut problem = |key: &str, msg: String| problems.push((key.to_owned(), msg));

        if self.server.listen.parse::<SocketAddr>().is_err() {
            problem(
                "server.listen",
                format!(
                    "{:?} is not an address with a port, e.g. 127.0.0.1:8080",
                    self.server.listen
                ),
            );
        }
        if self.admin.listen.parse::<SocketAddr>().is_err() {
            problem(
                "admin.listen",
                format!(
                    "{:?} is not an address with a port, e.g. 127.0.0.1:9090",
                    self.admin.listen
                ),
            );
        }
        if let (Ok(server), Ok(admin)) = (
            self.server.listen.parse::<SocketAddr>(),
            self.admin.listen.parse::<SocketAddr>(),
        ) {
            // Otherwise the second bind fails with "Address already in use", as if another
            // process held the port. An unspecified address (0.0.0.0) overlaps every other.
            let overlap = server.ip() == admin.ip()
                || server.ip().is_unspecified()
                || admin.ip().is_unspecified();
            if server.port() != 0 && server.port() == admin.port() && overlap {
                problem(
                    "admin.listen",
                    "must not share server.listen's port: the broker binds both".into(),
                );
            }
        }
        if self.server.worker_threads > 256 {
            problem("server.worker_threads", "must be at most 256".into());
        }
        if self.server.request_timeout_secs == 0 {
            problem("server.request_timeout_secs", "must be at least 1".into());
        }

        self.resolve_finapi_clients(&mut problem);
        let f = &self.finapi;
        if let Some(path) = &f.ca_file {
            if !f.has_single_client() {
                // Unlike the timeouts, it is not shared: silently unused, every client would
                // refuse a private CA's certificate.
                problem(
                    "finapi.ca_file",
                    "is the client \"default\"'s, which the single-client keys do not configure: \
                     set ca_file in each [finapi.clients.NAME] table that needs it"
                        .into(),
                );
            } else if let Err(err) = crate::tls::read_ca_file(path) {
                problem("finapi.ca_file", err.to_string());
            }
        }
        if f.connect_timeout_ms == 0 {
            problem("finapi.connect_timeout_ms", "must be at least 1".into());
        }
        if f.request_timeout_ms == 0 {
            problem("finapi.request_timeout_ms", "must be at least 1".into());
        }

        if FlowKind::parse(&self.flows.default_flow).is_none() {
            problem(
                "flows.default_flow",
                format!(
                    "{:?} is not a flow: use \"standalone\" or \"access\"",
                    self.flows.default_flow
                ),
            );
        }
        if let Err(msg) = check_process_id(&self.flows.process_id) {
            problem("flows.process_id", msg);
        }

        let l = &self.limits;
        for (key, value) in [
            ("limits.read_timeout_secs", l.read_timeout_secs),
            ("limits.max_in_flight", l.max_in_flight),
            ("limits.caller_rate_per_sec", l.caller_rate_per_sec),
            ("limits.caller_burst", l.caller_burst),
        ] {
            if value == 0 {
                problem(key, "must be at least 1".into());
            }
        }
        if !(1..=1024 * 1024).contains(&l.max_body_bytes) {
            problem(
                "limits.max_body_bytes",
                "must be between 1 and 1048576".into(),
            );
        }
        self.validate_resilience(&mut problem);
        self.resolve_identities(&mut problem);
        self.tracing.resolve(env, &mut problem);

        if self.log_format().is_none() {
            problem(
                "log.format",
                format!(
                    "{:?} is not a format: use \"auto\", \"json\" or \"pretty\"",
                    self.log.format
                ),
            );
        }
        if let Err(e) = self.log.filter.parse::<tracing_subscriber::EnvFilter>() {
            problem("log.filter", format!("not a valid filter: {e}"));
        }
        // RUST_LOG wins over log.filter (telemetry), so its mistakes are this file's too.
        if let Some(rust_log) = env("RUST_LOG").filter(|f| !f.trim().is_empty())
            && let Err(e) = rust_log.parse::<tracing_subscriber::EnvFilter>()
        {
            problem("RUST_LOG", format!("not a valid filter: {e}"));
        }

        if problems.is_empty() {
            Ok(())
        } else {
            Err(ConfigError { problems })
        }
    }

    /// Reads the finAPI clients' secrets and checks every client and the callers' choice of
    /// clients.
    fn resolve_finapi_clients(&mut self, problem: &mut impl FnMut(&str, String)) {
        let allow_http = self.finapi.allow_insecure_http;
        for (key, url) in [
            ("finapi.access_url", &self.finapi.access_url),
            (
                "finapi.process_controller_url",
                &self.finapi.process_controller_url,
            ),
        ] {
            if let Err(msg) = check_base_url(url, allow_http) {
                problem(key, msg);
            }
        }
        let single = self.finapi.has_single_client();
        if single {
            let f = &mut self.finapi;
            check_client_id("finapi.client_id", &f.client_id, problem);
            resolve_client_secret(
                "finapi",
                &mut f.client_secret,
                &f.client_secret_file,
                problem,
            );
        }
        for (name, client) in &mut self.finapi.clients {
            let prefix = format!("finapi.clients.{name}");
            if !valid_name(name) {
                problem(
                    &prefix,
                    "the name must be 1 to 64 characters of A-Z a-z 0-9 - _ .".into(),
                );
            }
            if single && name == DEFAULT_CLIENT {
                problem(
                    &prefix,
                    "the single-client keys (finapi.client_id, …) already configure the client \
                     \"default\": use one form"
                        .into(),
                );
            }
            check_client_id(&format!("{prefix}.client_id"), &client.client_id, problem);
            resolve_client_secret(
                &prefix,
                &mut client.client_secret,
                &client.client_secret_file,
                problem,
            );
            for (field, url) in [
                ("access_url", &client.access_url),
                ("process_controller_url", &client.process_controller_url),
            ] {
                if let Err(msg) = check_base_url(url, allow_http) {
                    problem(&format!("{prefix}.{field}"), msg);
                }
            }
            if let Some(pid) = &client.process_id
                && let Err(msg) = check_process_id(pid)
            {
                problem(&format!("{prefix}.process_id"), msg);
            }
            // The same check as `finapi.ca_file`'s: a bundle refused here would otherwise
            // pass `check-config` and stop the broker at start.
            if let Some(path) = &client.ca_file
                && let Err(err) = crate::tls::read_ca_file(path)
            {
                problem(&format!("{prefix}.ca_file"), err.to_string());
            }
        }
        let names = self.finapi.client_names();
        for (i, caller) in self.auth.callers.iter().enumerate() {
            let key = format!("auth.callers[{i}].finapi_clients");
            match &caller.finapi_clients {
                Some(list) if list.is_empty() => {
                    problem(&key, "must name at least one finAPI client".into())
                }
                Some(list) => {
                    for name in list {
                        if !names.contains(name) {
                            problem(&key, format!("{name:?} is not a configured finAPI client"));
                        }
                    }
                }
                None if !names.iter().any(|n| n == DEFAULT_CLIENT) => problem(
                    &key,
                    "must be set: there is no finAPI client named \"default\"".into(),
                ),
                None => {}
            }
        }
    }

    /// The configured finAPI clients (secrets read), `default` first when it exists. Valid
    /// only for validated settings.
    pub fn finapi_clients(&self) -> Vec<FinapiClientConfig> {
        let f = &self.finapi;
        let empty = || SecretString::from(String::new());
        let mut clients = Vec::new();
        if f.has_single_client() {
            clients.push(FinapiClientConfig {
                name: DEFAULT_CLIENT.to_owned(),
                client_id: f.client_id.clone(),
                client_secret: f.client_secret.clone().unwrap_or_else(empty),
                client_secret_file: f.client_secret_file.clone(),
                access_url: f.access_url.clone(),
                process_controller_url: f.process_controller_url.clone(),
                process_id: self.flows.process_id.clone(),
                ca_file: f.ca_file.clone(),
            });
        }
        for (name, c) in &f.clients {
            if clients.iter().any(|known| known.name == *name) {
                continue;
            }
            clients.push(FinapiClientConfig {
                name: name.clone(),
                client_id: c.client_id.clone(),
                client_secret: c.client_secret.clone().unwrap_or_else(empty),
                client_secret_file: c.client_secret_file.clone(),
                access_url: c.access_url.clone(),
                process_controller_url: c.process_controller_url.clone(),
                process_id: c
                    .process_id
                    .clone()
                    .unwrap_or_else(|| self.flows.process_id.clone()),
                ca_file: c.ca_file.clone(),
            });
        }
        clients
    }

    /// Reads the password keys and checks the ledger settings.
    fn resolve_identities(&mut self, problem: &mut impl FnMut(&str, String)) {
        use crate::identities::keys::MIN_KEY_BYTES;
        let too_short = format!("must be at least {MIN_KEY_BYTES} bytes");
        let i = &mut self.identities;
        match (&i.password_key, &i.password_key_file) {
            (Some(_), Some(_)) => problem(
                "identities.password_key",
                "set either identities.password_key or identities.password_key_file, not both"
                    .into(),
            ),
            (None, None) => problem(
                "identities.password_key",
                format!(
                    "must be set: {ENV_PREFIX}IDENTITIES__PASSWORD_KEY or \
                     identities.password_key_file (at least {MIN_KEY_BYTES} random bytes, e.g. \
                     `openssl rand -hex 32`)"
                ),
            ),
            (None, Some(path)) => match read_secret_file(path) {
                Ok(key) if key.expose_secret().len() < MIN_KEY_BYTES => {
                    problem("identities.password_key_file", too_short.clone())
                }
                Ok(key) => i.password_key = Some(key),
                Err(msg) => problem("identities.password_key_file", msg),
            },
            (Some(key), None) if key.expose_secret().len() < MIN_KEY_BYTES => {
                problem("identities.password_key", too_short.clone())
            }
            (Some(_), None) => {}
        }
        i.previous_password_keys.clear();
        for (n, path) in i.previous_password_key_files.iter().enumerate() {
            let key = format!("identities.previous_password_key_files[{n}]");
            match read_secret_file(path) {
                Ok(secret) if secret.expose_secret().len() < MIN_KEY_BYTES => {
                    problem(&key, too_short.clone())
                }
                Ok(secret) => i.previous_password_keys.push(secret),
                Err(msg) => problem(&key, msg),
            }
        }
        if let Some(path) = &i.database_url_file {
            if i.database_url.expose_secret() != default_database_url() {
                problem(
                    "identities.database_url",
                    "set either identities.database_url or identities.database_url_file, not both"
                        .into(),
                );
            } else {
                match read_secret_file(path) {
                    Ok(url) => i.database_url = url,
                    Err(msg) => problem("identities.database_url_file", msg),
                }
            }
        }
        let url_key = if i.database_url_file.is_some() {
            "identities.database_url_file"
        } else {
            "identities.database_url"
        };
        let url = i.database_url.expose_secret();
        let scheme = url.split_once(':').map(|(scheme, _)| scheme);
        if !matches!(scheme, Some("sqlite" | "postgres" | "postgresql")) {
            // The URL may hold a password: only its scheme is named.
            problem(
                url_key,
                "must be sqlite://PATH or postgres://… (the value is not shown)".into(),
            );
        } else if let Some(reason) = unreadable_database_url(url) {
            problem(url_key, format!("{reason} (the URL is not shown)"));
        }
        if i.database_max_connections == 0 {
            problem(
                "identities.database_max_connections",
                "must be at least 1".into(),
            );
        }
        if !matches!(i.sqlite_synchronous.as_str(), "full" | "intents" | "normal") {
            problem(
                "identities.sqlite_synchronous",
                format!(
                    "{:?} is not a setting: use \"full\", \"intents\" or \"normal\"",
                    i.sqlite_synchronous
                ),
            );
        }
        if !(1..=MAX_RETENTION_SECS).contains(&i.retention_secs) {
            problem(
                "identities.retention_secs",
                format!("must be between 1 and {MAX_RETENTION_SECS} (ten years)"),
            );
        }
        if !(1..=86_400).contains(&i.reaper_interval_secs) {
            problem(
                "identities.reaper_interval_secs",
                "must be between 1 and 86400".into(),
            );
        }
        if i.orphan_min_age_secs > 86_400 {
            problem(
                "identities.orphan_min_age_secs",
                "must be at most 86400".into(),
            );
        } else if i.orphan_min_age_secs <= self.server.request_timeout_secs {
            problem(
                "identities.orphan_min_age_secs",
                format!(
                    "must be longer than server.request_timeout_secs ({}): a request still \
                     running may yet create its user",
                    self.server.request_timeout_secs
                ),
            );
        }
        if i.reserved_intents > MAX_RESERVED_INTENTS {
            problem(
                "identities.reserved_intents",
                format!("must be at most {MAX_RESERVED_INTENTS}"),
            );
        }
        for (n, caller) in self.auth.callers.iter().enumerate() {
            if caller
                .retention_secs
                .is_some_and(|secs| !(1..=MAX_RETENTION_SECS).contains(&secs))
            {
                problem(
                    &format!("auth.callers[{n}].retention_secs"),
                    format!("must be between 1 and {MAX_RETENTION_SECS} (ten years)"),
                );
            }
        }
    }

    /// Resolves every caller's key to its SHA-256 and checks the callers.
    fn resolve_callers(&mut self, env: &dyn Fn(&str) -> Option<String>) -> Vec<(String, String)> {
        let mut problems = Vec::new();
        if !self.auth.disabled && self.auth.callers.is_empty() {
            problems.push((
                "auth.callers".to_owned(),
                "no callers configured: add [[auth.callers]] or set auth.disabled = true"
                    .to_owned(),
            ));
        }
        let mut names = std::collections::HashSet::new();
        let mut digests = std::collections::HashSet::new();
        for (i, caller) in self.auth.callers.iter_mut().enumerate() {
            let key = |field: &str| format!("auth.callers[{i}].{field}");
            if !valid_name(&caller.name) {
                problems.push((
                    key("name"),
                    "must be 1 to 64 characters of A-Z a-z 0-9 - _ .".into(),
                ));
            } else if !names.insert(caller.name.clone()) {
                problems.push((key("name"), format!("{:?} is used twice", caller.name)));
            }
            if caller.flows.is_empty() {
                problems.push((key("flows"), "must name at least one flow".into()));
            }
            for flow in &caller.flows {
                if FlowKind::parse(flow).is_none() {
                    problems.push((
                        key("flows"),
                        format!("{flow:?} is not a flow: use \"standalone\" or \"access\""),
                    ));
                }
            }
            for (field, value) in [
                ("rate_per_sec", caller.rate_per_sec),
                ("burst", caller.burst),
            ] {
                if value == Some(0) {
                    problems.push((key(field), "must be at least 1".into()));
                }
            }
            let digest = match (&caller.key_sha256, &caller.key_file, &caller.key_env) {
                (Some(hex), None, None) => decode_sha256(hex)
                    .ok_or_else(|| (key("key_sha256"), "must be 64 hex digits".to_owned())),
                (None, Some(path), None) => read_secret_file(path)
                    .map(|k| sha256(k.expose_secret().as_bytes()))
                    .map_err(|msg| (key("key_file"), msg)),
                (None, None, Some(var)) => match env(var) {
                    Some(k) if !k.is_empty() => Ok(sha256(k.as_bytes())),
                    _ => Err((
                        key("key_env"),
                        format!("environment variable {var} is not set"),
                    )),
                },
                _ => Err((
                    key("key_sha256"),
                    "set exactly one of key_sha256, key_file and key_env".to_owned(),
                )),
            };
            match digest {
                Ok(d) if !digests.insert(d) => {
                    problems.push((key("key_sha256"), "another caller has the same key".into()))
                }
                Ok(d) => caller.key_digest = Some(d),
                Err(p) => problems.push(p),
            }
        }
        problems
    }

    fn validate_resilience(&self, problem: &mut impl FnMut(&str, String)) {
        let r = &self.resilience;
        if r.max_attempts == 0 || r.max_attempts > 10 {
            problem("resilience.max_attempts", "must be 1 to 10".into());
        }
        if r.base_backoff_ms == 0 {
            problem("resilience.base_backoff_ms", "must be at least 1".into());
        }
        if r.max_backoff_ms < r.base_backoff_ms {
            problem(
                "resilience.max_backoff_ms",
                "must be at least resilience.base_backoff_ms".into(),
            );
        }
        // Compared only with valid values, so that one mistake is reported once.
        if self.finapi.request_timeout_ms > 0
            && r.session_budget_ms < self.finapi.request_timeout_ms
        {
            problem(
                "resilience.session_budget_ms",
                "must be at least finapi.request_timeout_ms".into(),
            );
        }
        if self.server.request_timeout_secs > 0
            && r.session_budget_ms > self.server.request_timeout_secs.saturating_mul(1000)
        {
            problem(
                "resilience.session_budget_ms",
                "must not exceed server.request_timeout_secs".into(),
            );
        }
        if r.breaker_failure_threshold == 0 {
            problem(
                "resilience.breaker_failure_threshold",
                "must be at least 1".into(),
            );
        }
        if r.breaker_cooldown_ms == 0 {
            problem(
                "resilience.breaker_cooldown_ms",
                "must be at least 1".into(),
            );
        }
    }

    /// The listen address (validated at load).
    pub fn listen_addr(&self) -> Result<SocketAddr, ConfigError> {
        self.server.listen.parse().map_err(|_| {
            ConfigError::single("server.listen", "not an address with a port".to_owned())
        })
    }

    /// The admin listen address (validated at load).
    pub fn admin_addr(&self) -> Result<SocketAddr, ConfigError> {
        self.admin.listen.parse().map_err(|_| {
            ConfigError::single("admin.listen", "not an address with a port".to_owned())
        })
    }

    /// The flow used when a request names none (validated at load; `standalone` otherwise).
    pub fn default_flow(&self) -> FlowKind {
        FlowKind::parse(&self.flows.default_flow).unwrap_or(FlowKind::Standalone)
    }

    /// The log format (None when the configured value is unknown).
    pub fn log_format(&self) -> Option<LogFormat> {
        match self.log.format.as_str() {
            "auto" => Some(LogFormat::Auto),
            "json" => Some(LogFormat::Json),
            "pretty" => Some(LogFormat::Pretty),
            _ => None,
        }
    }

    /// The drain period after SIGTERM.
    pub fn drain(&self) -> Duration {
        Duration::from_secs(self.server.drain_secs)
    }
}

type Table = toml::Table;

/// Most reserved intents per (caller, finAPI client): one refill is one batch of the ledger's
/// group-commit writer, which takes 128 writes at most.
pub const MAX_RESERVED_INTENTS: u64 = 128;

/// Longest identity retention, in seconds (ten years): far beyond any GiroIdent check, and
/// within every date the ledger and the API can write.
pub const MAX_RETENTION_SECS: u64 = 10 * 365 * 86_400;

/// Whether `key` holds a secret that only the environment may set, never a file:
/// `finapi.client_secret`, `finapi.clients.NAME.client_secret` and `identities.password_key`.
fn is_env_only(key: &str) -> bool {
    matches!(key, "finapi.client_secret" | "identities.password_key")
        || key
            .strip_prefix("finapi.clients.")
            .and_then(|rest| rest.rsplit_once('.'))
            .is_some_and(|(name, field)| !name.contains('.') && field == "client_secret")
}

/// The built-in defaults as figment data.
fn default_dict() -> Result<Dict, ConfigError> {
    Figment::from(Toml::string(DEFAULT_TOML))
        .data()
        .map(|mut profiles| profiles.remove(&Profile::Default).unwrap_or_default())
        .map_err(|e| ConfigError::single("(built-in defaults)", e.to_string()))
}

/// The value at a dotted key path (array items by their index).
fn find<'a>(dict: &'a Dict, path: &[String]) -> Option<&'a Value> {
    let (first, rest) = path.split_first()?;
    let mut value = dict.get(first)?;
    for part in rest {
        value = match value {
            Value::Dict(_, d) => d.get(part)?,
            Value::Array(_, items) => items.get(part.parse::<usize>().ok()?)?,
            _ => return None,
        };
    }
    Some(value)
}

/// Replaces the value at `path` with `value`, or removes it when `value` is `None`.
fn replace(dict: &mut Dict, path: &[String], value: Option<Value>) {
    let Some((last, parents)) = path.split_last() else {
        return;
    };
    let mut node = dict;
    let mut parts = parents.iter();
    while let Some(part) = parts.next() {
        node = match node.get_mut(part) {
            Some(Value::Dict(_, d)) => d,
            // A table in an array (`auth.callers[0]`): go on in that item.
            Some(Value::Array(_, items)) => {
                let item = parts
                    .next()
                    .and_then(|i| i.parse::<usize>().ok())
                    .and_then(|i| items.get_mut(i));
                match item {
                    Some(Value::Dict(_, d)) => d,
                    _ => return,
                }
            }
            _ => return,
        };
    }
    match value {
        Some(value) => {
            node.insert(last.clone(), value);
        }
        None => {
            node.remove(last);
        }
    }
}

/// A figment key path as the configuration reference writes it: `auth.callers[0].name`.
fn key_name(path: &[String]) -> String {
    let mut key = String::new();
    for part in path {
        if part.parse::<usize>().is_ok() {
            key.push_str(&format!("[{part}]"));
        } else {
            if !key.is_empty() {
                key.push('.');
            }
            key.push_str(part);
        }
    }
    key
}

/// What kind of value was found, never the value itself (it may be a secret).
fn kind_of(actual: &figment::error::Actual) -> &'static str {
    use figment::error::Actual;
    match actual {
        Actual::Bool(_) => "a boolean",
        Actual::Unsigned(_) | Actual::Signed(_) | Actual::Float(_) => "a number",
        Actual::Char(_) | Actual::Str(_) | Actual::Bytes(_) => "a string",
        Actual::Seq => "an array",
        Actual::Map => "a table",
        _ => "another kind of value",
    }
}

/// Turns each figment layer into one value of the [`Settings`] type. figment, like serde,
/// stops at the first problem; to report every one at once, each problem is recorded with its
/// key, the offending value goes back to its default (or is dropped), and extraction runs
/// again. `sources` names the environment variable (or preset) behind a key, for the message.
fn extract_all(
    mut data: Dict,
    defaults: &Dict,
    sources: &[(String, String)],
    problems: &mut Vec<(String, String)>,
) -> Option<Settings> {
    let source = |key: &str| {
        sources
            .iter()
            .find(|(k, _)| {
                key == k || key.starts_with(&format!("{k}.")) || key.starts_with(&format!("{k}["))
            })
            .map(|(_, name)| format!(" (from {name})"))
            .unwrap_or_default()
    };
    let mut seen = std::collections::HashSet::new();
    // A required key without a default (`client_id` in a `[finapi.clients.NAME]` table,
    // `flows` in a caller) comes back as missing once its wrong value is dropped: it gets
    // these stand-ins in turn, without a second problem, so that extraction goes on and the
    // later keys' problems (and the checks after extraction) are still reported.
    let mut stand_ins: std::collections::HashMap<String, usize> = Default::default();
    let stand_in = |i: usize| -> Option<Value> {
        match i {
            0 => Some(Value::from(String::new())),
            1 => Some(Value::from(Vec::<Value>::new())),
            2 => Some(Value::from(0u64)),
            3 => Some(Value::from(false)),
            4 => Some(Value::from(Dict::new())),
            _ => None,
        }
    };
    loop {
        let error = match Figment::from(Serialized::defaults(&data)).extract_lossy::<Settings>() {
            Ok(settings) => return Some(settings),
            Err(error) => error,
        };
        let mut path = error.path.clone();
        let (message, fallback) = match &error.kind {
            Kind::UnknownField(field, _) => {
                if path.last() != Some(field) {
                    path.push(field.clone());
                }
                ("unknown key".to_owned(), None)
            }
            Kind::MissingField(field) => {
                if path.last().map(String::as_str) != Some(field) {
                    path.push(field.to_string());
                }
                ("must be set".to_owned(), Some(Value::from(String::new())))
            }
            Kind::InvalidType(actual, expected) => (
                format!("must be {expected}, not {}", kind_of(actual)),
                find(defaults, &path).cloned(),
            ),
            Kind::InvalidValue(_, expected) => (
                format!("must be {expected}"),
                find(defaults, &path).cloned(),
            ),
            Kind::InvalidLength(_, expected) => (
                format!("must be {expected}"),
                find(defaults, &path).cloned(),
            ),
            // A free-form message may quote the value, which may be a secret.
            Kind::Message(_) => ("invalid value".to_owned(), find(defaults, &path).cloned()),
            _ => ("invalid value".to_owned(), find(defaults, &path).cloned()),
        };
        let key = key_name(&path);
        if path.is_empty() {
            problems.push(("(config)".into(), message));
            return None;
        }
        if !seen.insert(key.clone()) {
            let tried = stand_ins.entry(key).or_default();
            let Some(value) = stand_in(*tried) else {
                // No stand-in fits: what was found so far is reported.
                return None;
            };
            *tried += 1;
            replace(&mut data, &path, Some(value));
            continue;
        }
        problems.push((key.clone(), format!("{message}{}", source(&key))));
        replace(&mut data, &path, fallback);
    }
}

/// One layer given as `(key, text)` pairs, environment-style: the text of a key whose default
/// is an array is read as a TOML value, any other text stays a string (figment's lossy
/// extraction reads numbers and booleans out of it where the key wants one). Keys naming a
/// whole section are refused.
fn text_layer(
    defaults: &Dict,
    pairs: impl IntoIterator<Item = (String, String, String)>,
    sources: &mut Vec<(String, String)>,
    problems: &mut Vec<(String, String)>,
) -> Table {
    let mut table = Table::new();
    for (key, source, raw) in pairs {
        let path: Vec<String> = key.split('.').map(str::to_owned).collect();
        let value = match find(defaults, &path) {
            Some(Value::Dict(..)) => {
                problems.push((key, format!("unknown key (from {source})")));
                continue;
            }
            Some(Value::Array(..)) => match format!("x = {raw}")
                .parse::<Table>()
                .ok()
                .and_then(|mut t| t.remove("x"))
                .filter(toml::Value::is_array)
            {
                Some(value) => value,
                None => {
                    problems.push((key, format!("must be a TOML array (from {source})")));
                    continue;
                }
            },
            _ => toml::Value::String(raw),
        };
        insert(&mut table, &key, value);
        sources.push((key, source));
    }
    table
}

fn insert(table: &mut Table, key: &str, value: toml::Value) {
    let mut parts: Vec<&str> = key.split('.').collect();
    let last = parts.pop().unwrap_or_default();
    let mut table = table;
    for part in parts {
        let entry = table
            .entry(part)
            .or_insert_with(|| toml::Value::Table(Table::new()));
        match entry {
            toml::Value::Table(t) => table = t,
            _ => return,
        }
    }
    table.insert(last.to_owned(), value);
}

/// Removes the secrets a file must not hold (see [`is_env_only`]), each one a problem.
fn refuse_file_secrets(table: &mut Table, prefix: &str, problems: &mut Vec<(String, String)>) {
    let keys: Vec<String> = table.keys().cloned().collect();
    for name in keys {
        let key = if prefix.is_empty() {
            name.clone()
        } else {
            format!("{prefix}.{name}")
        };
        if is_env_only(&key) {
            table.remove(&name);
            let env = format!(
                "{ENV_PREFIX}{}",
                key.to_ascii_uppercase().replace('.', "__")
            );
            problems.push((
                key.clone(),
                format!("not in a file: set {env} or {key}_file"),
            ));
        } else if let Some(toml::Value::Table(inner)) = table.get_mut(&name) {
            refuse_file_secrets(inner, &key, problems);
        }
    }
}

/// The secret settings that come in two forms (the value, or a file holding it), as the
/// table paths that hold them: `finapi` and each `finapi.clients.NAME`.
fn secret_holders(table: &Table) -> Vec<Vec<String>> {
    let mut holders = vec![vec!["finapi".to_owned()]];
    if let Some(clients) = table
        .get("finapi")
        .and_then(|f| f.get("clients"))
        .and_then(toml::Value::as_table)
    {
        for name in clients.keys() {
            holders.push(vec!["finapi".into(), "clients".into(), name.clone()]);
        }
    }
    holders
}

fn table_at<'a>(table: &'a mut Table, path: &[String]) -> Option<&'a mut Table> {
    let mut node = table;
    for part in path {
        node = node.get_mut(part)?.as_table_mut()?;
    }
    Some(node)
}

/// A secret the user sets in either form replaces both forms of the preset's.
fn drop_replaced_preset_secrets(preset: &mut Table, user: &mut [&mut Table]) {
    for layer in user.iter_mut() {
        for holder in secret_holders(layer) {
            let user_sets = table_at(layer, &holder).is_some_and(|t| {
                t.contains_key("client_secret") || t.contains_key("client_secret_file")
            });
            if user_sets && let Some(p) = table_at(preset, &holder) {
                p.remove("client_secret");
                p.remove("client_secret_file");
            }
        }
    }
}

/// A caller's or finAPI client's name: 1 to 64 characters of `A-Z a-z 0-9 - _ .`, safe in
/// logs and metric labels.
fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
}

fn check_client_id(key: &str, id: &str, problem: &mut impl FnMut(&str, String)) {
    if id.trim().is_empty() {
        problem(key, "must be set".into());
    } else if id.chars().any(|c| c.is_control()) {
        problem(key, "must not contain control characters".into());
    }
}

/// Checks a client secret given in one of its two forms under `prefix` and reads its file.
fn resolve_client_secret(
    prefix: &str,
    secret: &mut Option<SecretString>,
    file: &Option<PathBuf>,
    problem: &mut impl FnMut(&str, String),
) {
    let key = format!("{prefix}.client_secret");
    match (&*secret, file) {
        (Some(_), Some(_)) => problem(&key, format!("set either {key} or {key}_file, not both")),
        (None, None) => {
            // Variable names are read in lower case and split at `__`: a client named with
            // upper case or `.` cannot be reached by one, so none is suggested.
            let reachable = prefix
                .strip_prefix("finapi.clients.")
                .is_none_or(|name| !name.contains('.') && name == name.to_ascii_lowercase());
            if reachable {
                let env = format!(
                    "{ENV_PREFIX}{}",
                    key.to_ascii_uppercase().replace('.', "__")
                );
                problem(&key, format!("must be set: {env} or {key}_file"))
            } else {
                problem(
                    &key,
                    format!(
                        "must be set: {key}_file (a client named with upper case or `.` cannot \
                         take its secret from the environment)"
                    ),
                )
            }
        }
        (None, Some(path)) => match read_secret_file(path) {
            Ok(value) => *secret = Some(value),
            Err(msg) => problem(&format!("{key}_file"), msg),
        },
        (Some(value), None) if value.expose_secret().is_empty() => {
            problem(&key, "must not be empty".into())
        }
        (Some(_), None) => {}
    }
}

/// GiroIdent's `processId`: 1 to 64 characters of `A-Z a-z 0-9 _`.
fn check_process_id(pid: &str) -> Result<(), String> {
    if pid.is_empty()
        || pid.len() > 64
        || !pid.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
    {
        return Err("must be 1 to 64 characters of A-Z, a-z, 0-9 and _ (e.g. GIROIDENT)".into());
    }
    Ok(())
}

fn check_base_url(url: &str, allow_http: bool) -> Result<(), String> {
    let parsed = reqwest::Url::parse(url).map_err(|e| format!("{url:?} is not a URL: {e}"))?;
    match parsed.scheme() {
        "https" => {}
        "http" if allow_http => {}
        "http" => {
            return Err(
                "must be https (set finapi.allow_insecure_http only for a local simulator)".into(),
            );
        }
        other => return Err(format!("unsupported scheme {other:?}")),
    }
    if parsed.host_str().is_none() {
        return Err("has no host".into());
    }
    if parsed.query().is_some() || parsed.fragment().is_some() {
        return Err("must not have a query or fragment".into());
    }
    if !parsed.username().is_empty() || parsed.password().is_some() {
        return Err("must not carry credentials".into());
    }
    Ok(())
}

/// Why sqlx could not read `url` as the ledger's connection options, parsed as the store
/// parses it at start but without connecting, so that `check-config` refuses what `serve`
/// would. The reason never holds the URL's password: the URL parser's errors are fixed texts,
/// and of the query parameters sqlx repeats only a bad `sslmode` value.
fn unreadable_database_url(url: &str) -> Option<String> {
    use std::str::FromStr;
    let url = url.trim();
    let parsed = if url.starts_with("sqlite:") {
        sqlx::sqlite::SqliteConnectOptions::from_str(url).map(drop)
    } else {
        sqlx::postgres::PgConnectOptions::from_str(url).map(drop)
    };
    parsed.err().map(|error| {
        let reason = error.to_string();
        let reason = reason.trim_start_matches("error with configuration: ");
        format!("cannot be read as a database URL: {reason}")
    })
}

/// `identities.database_url` as `config/default.toml` sets it: `identities.database_url_file`
/// may only be combined with this value, so that a URL set in two places is refused.
fn default_database_url() -> String {
    DEFAULT_TOML
        .parse::<Table>()
        .ok()
        .and_then(|t| {
            t.get("identities")?
                .get("database_url")?
                .as_str()
                .map(str::to_owned)
        })
        .unwrap_or_default()
}

/// Reads a secret from a file (a Docker or Kubernetes secret): one trailing newline (`\n` or
/// `\r\n`) is dropped, and an empty secret is refused.
pub fn read_secret_file(path: &Path) -> Result<SecretString, String> {
    let raw = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read {}: {}", path.display(), e.kind()))?;
    let secret = raw
        .strip_suffix('\n')
        .map(|s| s.strip_suffix('\r').unwrap_or(s))
        .unwrap_or(&raw);
    if secret.is_empty() {
        return Err(format!("{} is empty", path.display()));
    }
    Ok(SecretString::from(secret.to_owned()))
}

/// SHA-256 of `bytes`.
pub fn sha256(bytes: &[u8]) -> [u8; 32] {
    use sha2::Digest;
    sha2::Sha256::digest(bytes).into()
}

/// Lower-case hex of a digest.
pub fn to_hex(bytes: &[u8]) -> String {
    // Once per access session (a derived password): no `format!` per byte.
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut hex = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        hex.push(char::from(DIGITS[usize::from(b >> 4)]));
        hex.push(char::from(DIGITS[usize::from(b & 0x0f)]));
    }
    hex
}

fn decode_sha256(hex: &str) -> Option<[u8; 32]> {
    let hex = hex.as_bytes();
    if hex.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, pair) in hex.chunks(2).enumerate() {
        let text = std::str::from_utf8(pair).ok()?;
        out[i] = u8::from_str_radix(text, 16).ok()?;
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    const WEB_KEY_SHA256: &str = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"; // sha256("test")

    fn valid_env() -> Vec<(String, String)> {
        env(&[
            ("GIROIDENT_BROKER_FINAPI__CLIENT_ID", "client"),
            ("GIROIDENT_BROKER_FINAPI__CLIENT_SECRET", "s3cret"),
            (
                "GIROIDENT_BROKER_IDENTITIES__PASSWORD_KEY",
                "a-password-key-of-at-least-32-bytes-0123",
            ),
            (
                "GIROIDENT_BROKER_AUTH__CALLERS",
                &format!(
                    r#"[{{name = "web", key_sha256 = "{WEB_KEY_SHA256}", flows = ["standalone", "access"]}}]"#
                ),
            ),
        ])
    }

    fn with_callers(callers_toml: &str) -> Result<Settings, ConfigError> {
        let mut vars = valid_env();
        vars.retain(|(k, _)| k != "GIROIDENT_BROKER_AUTH__CALLERS");
        vars.push(("GIROIDENT_BROKER_AUTH__CALLERS".into(), callers_toml.into()));
        vars.push(("WEB_API_KEY".into(), "from-env".into()));
        Settings::load_with_env(None, vars)
    }

    #[test]
    fn callers_resolve_their_key_digests() {
        let s = Settings::load_with_env(None, valid_env()).expect("valid");
        let caller = &s.auth.callers[0];
        assert_eq!(caller.key_digest(), Some(sha256(b"test")));
        assert_eq!(
            caller.flow_kinds(),
            [FlowKind::Standalone, FlowKind::Access]
        );
        let s = with_callers(r#"[{name = "a", key_env = "WEB_API_KEY", flows = ["access"]}]"#)
            .expect("valid");
        assert_eq!(s.auth.callers[0].key_digest(), Some(sha256(b"from-env")));
        assert!(!format!("{s:?}").contains("from-env"));
    }

    #[test]
    fn no_callers_is_refused_unless_auth_is_disabled() {
        let err = with_callers("[]").unwrap_err();
        assert!(err.mentions("auth.callers"), "{err}");
        let mut vars = valid_env();
        vars.retain(|(k, _)| k != "GIROIDENT_BROKER_AUTH__CALLERS");
        vars.push(("GIROIDENT_BROKER_AUTH__DISABLED".into(), "true".into()));
        assert!(Settings::load_with_env(None, vars).is_ok());
    }

    #[test]
    fn every_caller_problem_is_reported_with_its_index() {
        let err = with_callers(&format!(
            r#"[{{name = "bad name", key_sha256 = "zz", flows = []}},
                {{name = "b", key_env = "MISSING_VAR", flows = ["video"], burst = 0}},
                {{name = "c", key_sha256 = "{WEB_KEY_SHA256}", key_env = "WEB_API_KEY", flows = ["access"]}},
                {{name = "d", key_sha256 = "{WEB_KEY_SHA256}", flows = ["access"]}},
                {{name = "d", key_sha256 = "{WEB_KEY_SHA256}", flows = ["access"]}}]"#
        ))
        .unwrap_err();
        for key in [
            "auth.callers[0].name",
            "auth.callers[0].key_sha256",
            "auth.callers[0].flows",
            "auth.callers[1].key_env",
            "auth.callers[1].flows",
            "auth.callers[1].burst",
            "auth.callers[2].key_sha256",
            "auth.callers[4].name",
            "auth.callers[4].key_sha256",
        ] {
            assert!(err.mentions(key), "{key} missing from: {err}");
        }
    }

    #[test]
    fn defaults_need_only_client_credentials() {
        let s = Settings::load_with_env(None, valid_env()).expect("valid");
        assert_eq!(s.finapi.access_url, "https://sandbox.finapi.io");
        assert_eq!(s.flows.process_id, "GIROIDENT");
        assert_eq!(s.default_flow(), FlowKind::Standalone);
        assert_eq!(s.finapi.client_id, "client");
    }

    #[test]
    fn defaults_without_credentials_name_both_keys() {
        let err = Settings::defaults().unwrap_err();
        assert!(err.mentions("finapi.client_id"), "{err}");
        assert!(err.mentions("finapi.client_secret"), "{err}");
    }

    #[test]
    fn every_invalid_setting_is_reported_at_once_with_its_key() {
        let mut vars = valid_env();
        vars.extend(env(&[
            ("GIROIDENT_BROKER_SERVER__LISTEN", "not-an-address"),
            ("GIROIDENT_BROKER_SERVER__REQUEST_TIMEOUT_SECS", "0"),
            ("GIROIDENT_BROKER_FINAPI__ACCESS_URL", "http://example.test"),
            ("GIROIDENT_BROKER_FINAPI__PROCESS_CONTROLLER_URL", "nope"),
            ("GIROIDENT_BROKER_FINAPI__CONNECT_TIMEOUT_MS", "0"),
            ("GIROIDENT_BROKER_FINAPI__REQUEST_TIMEOUT_MS", "0"),
            ("GIROIDENT_BROKER_FLOWS__DEFAULT_FLOW", "video"),
            ("GIROIDENT_BROKER_FLOWS__PROCESS_ID", "GIRO IDENT"),
            ("GIROIDENT_BROKER_LOG__FORMAT", "xml"),
            ("GIROIDENT_BROKER_LOG__FILTER", "info,[[["),
            ("GIROIDENT_BROKER_LIMITS__MAX_IN_FLIGHT", "0"),
            ("GIROIDENT_BROKER_LIMITS__MAX_BODY_BYTES", "0"),
        ]));
        let err = Settings::load_with_env(None, vars).unwrap_err();
        for key in [
            "server.listen",
            "server.request_timeout_secs",
            "finapi.access_url",
            "finapi.process_controller_url",
            "finapi.connect_timeout_ms",
            "finapi.request_timeout_ms",
            "flows.default_flow",
            "flows.process_id",
            "log.format",
            "log.filter",
            "limits.max_in_flight",
            "limits.max_body_bytes",
        ] {
            assert!(err.mentions(key), "{key} missing from: {err}");
        }
        assert_eq!(err.problems.len(), 12, "{err}");
    }

    #[test]
    fn resilience_settings_are_checked_with_their_keys() {
        let mut vars = valid_env();
        vars.extend(env(&[
            ("GIROIDENT_BROKER_RESILIENCE__MAX_ATTEMPTS", "0"),
            ("GIROIDENT_BROKER_RESILIENCE__BASE_BACKOFF_MS", "500"),
            ("GIROIDENT_BROKER_RESILIENCE__MAX_BACKOFF_MS", "100"),
            ("GIROIDENT_BROKER_RESILIENCE__SESSION_BUDGET_MS", "40000"),
            (
                "GIROIDENT_BROKER_RESILIENCE__BREAKER_FAILURE_THRESHOLD",
                "0",
            ),
            ("GIROIDENT_BROKER_RESILIENCE__BREAKER_COOLDOWN_MS", "0"),
        ]));
        let err = Settings::load_with_env(None, vars).unwrap_err();
        for key in [
            "resilience.max_attempts",
            "resilience.max_backoff_ms",
            "resilience.session_budget_ms",
            "resilience.breaker_failure_threshold",
            "resilience.breaker_cooldown_ms",
        ] {
            assert!(err.mentions(key), "{key} missing from: {err}");
        }
        let mut vars = valid_env();
        vars.push((
            "GIROIDENT_BROKER_RESILIENCE__SESSION_BUDGET_MS".into(),
            "5000".into(),
        ));
        let err = Settings::load_with_env(None, vars).unwrap_err();
        assert!(
            err.to_string().contains("finapi.request_timeout_ms"),
            "{err}"
        );
    }

    #[test]
    fn wrong_type_names_the_key() {
        let mut vars = valid_env();
        vars.push(("GIROIDENT_BROKER_SERVER__DRAIN_SECS".into(), "soon".into()));
        let err = Settings::load_with_env(None, vars).unwrap_err();
        assert!(err.mentions("server.drain_secs"), "{err}");
    }

    #[test]
    fn identity_durations_are_bounded_with_their_keys() {
        let mut vars = valid_env();
        for (key, value) in [
            ("IDENTITIES__RETENTION_SECS", "9223372036854775807"),
            ("IDENTITIES__REAPER_INTERVAL_SECS", "0"),
            ("IDENTITIES__ORPHAN_MIN_AGE_SECS", "10"),
            ("IDENTITIES__SQLITE_SYNCHRONOUS", "off"),
            ("IDENTITIES__RESERVED_INTENTS", "129"),
        ] {
            vars.push((format!("{ENV_PREFIX}{key}"), value.into()));
        }
        let err = Settings::load_with_env(None, vars).unwrap_err();
        for key in [
            "identities.retention_secs",
            "identities.reaper_interval_secs",
            "identities.orphan_min_age_secs",
            "identities.sqlite_synchronous",
            "identities.reserved_intents",
        ] {
            assert!(err.mentions(key), "{err}");
        }
    }

    #[test]
    fn tracing_is_off_by_default_and_the_standard_variables_win_over_the_keys() {
        let s = Settings::load_with_env(None, valid_env()).unwrap();
        assert_eq!(s.tracing.traces_url(), None);
        assert!(!s.tracing.propagate_to_finapi);
        assert_eq!(s.tracing.sampler(), Some(TraceSampler::ParentBasedAlwaysOn));

        let mut vars = valid_env();
        vars.extend(env(&[
            (
                "GIROIDENT_BROKER_TRACING__ENDPOINT",
                "http://file-side:4318",
            ),
            ("GIROIDENT_BROKER_TRACING__SERVICE_NAME", "from-key"),
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4318/"),
            ("OTEL_SERVICE_NAME", "from-otel"),
            ("OTEL_TRACES_SAMPLER", "parentbased_traceidratio"),
            ("OTEL_TRACES_SAMPLER_ARG", "0.25"),
            ("OTEL_EXPORTER_OTLP_HEADERS", "api-key=k%3D1,x-tenant = a "),
            ("OTEL_EXPORTER_OTLP_TIMEOUT", ""),
        ]));
        let s = Settings::load_with_env(None, vars.clone()).unwrap();
        let t = &s.tracing;
        assert_eq!(
            t.traces_url().as_deref(),
            Some("http://collector:4318/v1/traces")
        );
        assert_eq!(t.service_name, "from-otel");
        assert_eq!(
            t.sampler(),
            Some(TraceSampler::ParentBasedTraceIdRatio(0.25))
        );
        assert_eq!(
            t.header_pairs().unwrap(),
            vec![
                ("api-key".to_owned(), "k=1".to_owned()),
                ("x-tenant".to_owned(), "a".to_owned())
            ]
        );
        assert_eq!(t.timeout_ms, 10000, "an empty variable counts as unset");
        assert!(!format!("{s:?}").contains("k%3D1"), "headers are secret");

        vars.push((
            "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT".into(),
            "https://c/t".into(),
        ));
        let s = Settings::load_with_env(None, vars.clone()).unwrap();
        assert_eq!(s.tracing.traces_url().as_deref(), Some("https://c/t"));
        vars.push(("OTEL_SDK_DISABLED".into(), "true".into()));
        let s = Settings::load_with_env(None, vars).unwrap();
        assert_eq!(s.tracing.traces_url(), None);
    }

    #[test]
    fn bad_tracing_settings_are_reported_with_their_keys_and_no_header_value() {
        let mut vars = valid_env();
        vars.extend(env(&[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "collector:4318"),
            ("OTEL_TRACES_SAMPLER", "sometimes"),
            ("OTEL_TRACES_SAMPLER_ARG", "2"),
            (
                "OTEL_EXPORTER_OTLP_HEADERS",
                "api-key=hunter2-secret,broken",
            ),
            ("GIROIDENT_BROKER_TRACING__MAX_QUEUE_SIZE", "0"),
        ]));
        let err = Settings::load_with_env(None, vars).unwrap_err();
        for key in [
            "tracing.endpoint",
            "tracing.sampler",
            "tracing.sampler_arg",
            "tracing.headers",
            "tracing.max_queue_size",
        ] {
            assert!(err.mentions(key), "{key}: {err}");
        }
        assert!(!err.to_string().contains("hunter2"), "{err}");
    }

    #[test]
    fn unknown_key_is_refused() {
        let mut vars = valid_env();
        vars.push(("GIROIDENT_BROKER_FINAPI__CLIENT_SECERT".into(), "x".into()));
        let err = Settings::load_with_env(None, vars).unwrap_err();
        assert!(err.to_string().contains("client_secert"), "{err}");
    }

    #[test]
    fn http_upstream_is_allowed_only_when_asked() {
        let mut vars = valid_env();
        vars.extend(env(&[
            ("GIROIDENT_BROKER_FINAPI__ACCESS_URL", "http://127.0.0.1:1"),
            (
                "GIROIDENT_BROKER_FINAPI__PROCESS_CONTROLLER_URL",
                "http://127.0.0.1:1",
            ),
        ]));
        assert!(Settings::load_with_env(None, vars.clone()).is_err());
        vars.push((
            "GIROIDENT_BROKER_FINAPI__ALLOW_INSECURE_HTTP".into(),
            "true".into(),
        ));
        assert!(Settings::load_with_env(None, vars).is_ok());
    }

    #[test]
    fn secret_comes_from_a_file_without_its_newline() {
        let dir = std::env::temp_dir().join(format!("gib-cfg-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("secret");
        std::fs::write(&path, "from-file\n").unwrap();
        let mut vars = valid_env();
        vars.retain(|(k, _)| !k.ends_with("CLIENT_SECRET"));
        vars.push((
            "GIROIDENT_BROKER_FINAPI__CLIENT_SECRET_FILE".into(),
            path.to_str().unwrap().into(),
        ));
        let s = Settings::load_with_env(None, vars).expect("valid");
        assert_eq!(
            s.finapi.client_secret.as_ref().unwrap().expose_secret(),
            "from-file"
        );
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn database_url_comes_from_a_file_and_is_never_set_twice() {
        let dir = std::env::temp_dir().join(format!("gib-cfg-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        let url = "postgres://giroident:pg-pass-1@db/giroident";
        let path = dir.join("database_url");
        std::fs::write(&path, format!("{url}\n")).unwrap();
        let file_var = (
            "GIROIDENT_BROKER_IDENTITIES__DATABASE_URL_FILE".to_owned(),
            path.to_str().unwrap().to_owned(),
        );
        let mut vars = valid_env();
        vars.push(file_var.clone());
        let s = Settings::load_with_env(None, vars.clone()).expect("valid");
        assert_eq!(s.identities.database_url.expose_secret(), url);

        // Both forms at once: refused, naming the keys but neither URL.
        vars.push((
            "GIROIDENT_BROKER_IDENTITIES__DATABASE_URL".into(),
            "postgres://other:pg-pass-2@db/other".into(),
        ));
        let err = Settings::load_with_env(None, vars).unwrap_err();
        assert!(err.mentions("identities.database_url"), "{err}");
        let text = err.to_string();
        assert!(text.contains("database_url_file"), "{text}");
        assert!(!text.contains("pg-pass"), "{text}");

        // A file whose URL is no database URL: the file's key is named, its content is not.
        std::fs::write(&path, "mysql://u:pg-pass-3@db/x").unwrap();
        let mut vars = valid_env();
        vars.push(file_var.clone());
        let err = Settings::load_with_env(None, vars).unwrap_err();
        assert!(err.mentions("identities.database_url_file"), "{err}");
        assert!(!err.to_string().contains("pg-pass"), "{err}");

        std::fs::remove_dir_all(&dir).unwrap();
        let mut vars = valid_env();
        vars.push(file_var);
        let err = Settings::load_with_env(None, vars).unwrap_err();
        assert!(err.mentions("identities.database_url_file"), "{err}");
    }

    #[test]
    fn missing_secret_file_is_reported_without_its_content() {
        let vars = env(&[
            ("GIROIDENT_BROKER_FINAPI__CLIENT_ID", "client"),
            (
                "GIROIDENT_BROKER_FINAPI__CLIENT_SECRET_FILE",
                "/nonexistent/secret",
            ),
        ]);
        let err = Settings::load_with_env(None, vars).unwrap_err();
        assert!(err.mentions("finapi.client_secret_file"), "{err}");
    }

    #[test]
    fn a_config_file_never_carries_the_secret_nor_echoes_it() {
        let dir = std::env::temp_dir().join(format!("gib-cfg-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("broker.toml");
        std::fs::write(&path, "[finapi]\nclient_secret = \"file-secret-1\"\n").unwrap();
        let err = Settings::load_with_env(Some(&path), valid_env()).unwrap_err();
        assert!(err.mentions("finapi.client_secret"), "{err}");
        assert!(!err.to_string().contains("file-secret-1"), "{err}");
        // A malformed line is reported by its number, not quoted.
        std::fs::write(&path, "[finapi]\nclient_secret = \"file-secret-2\n").unwrap();
        let err = Settings::load_with_env(Some(&path), valid_env()).unwrap_err();
        assert!(err.to_string().contains("line 2"), "{err}");
        assert!(!err.to_string().contains("file-secret-2"), "{err}");
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn config_file_overrides_defaults_and_env_overrides_file() {
        let dir = std::env::temp_dir().join(format!("gib-cfg-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("broker.toml");
        std::fs::write(
            &path,
            "[flows]\ndefault_flow = \"access\"\nprocess_id = \"USER_ONLY\"\n",
        )
        .unwrap();
        let mut vars = valid_env();
        vars.push((
            "GIROIDENT_BROKER_FLOWS__PROCESS_ID".into(),
            "GIROIDENT".into(),
        ));
        let s = Settings::load_with_env(Some(&path), vars).expect("valid");
        assert_eq!(s.default_flow(), FlowKind::Access);
        assert_eq!(s.flows.process_id, "GIROIDENT");
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn a_preset_lies_between_the_defaults_and_the_file_and_environment() {
        let dir = std::env::temp_dir().join(format!("gib-cfg-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("broker.toml");
        std::fs::write(&path, "[limits]\ncaller_burst = 500\n").unwrap();
        std::fs::write(dir.join("secret"), "from-file\n").unwrap();
        let preset = env(&[
            ("limits.caller_burst", "7"),
            ("limits.caller_rate_per_sec", "3"),
            ("flows.process_id", "USER_ONLY"),
            ("finapi.client_secret", "preset-secret"),
        ]);
        let mut vars = valid_env();
        vars.retain(|(k, _)| !k.ends_with("CLIENT_SECRET"));
        vars.push((
            "GIROIDENT_BROKER_LIMITS__CALLER_RATE_PER_SEC".into(),
            "9".into(),
        ));
        let s = Settings::load_layered(preset.clone(), Some(&path), vars.clone()).expect("valid");
        assert_eq!(s.limits.caller_burst, 500);
        assert_eq!(s.limits.caller_rate_per_sec, 9);
        assert_eq!(s.flows.process_id, "USER_ONLY");
        assert_eq!(
            s.finapi.client_secret.as_ref().unwrap().expose_secret(),
            "preset-secret"
        );
        // A secret file given by the user replaces the preset's secret instead of clashing.
        vars.push((
            "GIROIDENT_BROKER_FINAPI__CLIENT_SECRET_FILE".into(),
            dir.join("secret").to_str().unwrap().into(),
        ));
        let s = Settings::load_layered(preset, Some(&path), vars).expect("valid");
        assert_eq!(
            s.finapi.client_secret.as_ref().unwrap().expose_secret(),
            "from-file"
        );
        let err =
            Settings::load_layered(env(&[("limits.burst", "1")]), None, valid_env()).unwrap_err();
        assert!(err.mentions("limits.burst"), "{err}");
        std::fs::remove_dir_all(dir).unwrap();
    }

    fn write_config(text: &str) -> (PathBuf, PathBuf) {
        let dir = std::env::temp_dir().join(format!("gib-cfg-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("broker.toml");
        std::fs::write(&path, text).unwrap();
        (dir, path)
    }

    #[test]
    fn named_clients_sit_beside_the_single_client_keys_as_default() {
        let (dir, path) = write_config(&format!(
            r#"
[finapi.clients.live]
client_id = "live-id"
access_url = "https://live.example"
process_controller_url = "https://pc.live.example"
process_id = "USER_ONLY"

[finapi.clients.sandbox]
client_id = "sandbox-id"
client_secret_file = "{secret}"
access_url = "https://sandbox.example"
process_controller_url = "https://pc.sandbox.example"

[[auth.callers]]
name = "shop"
key_sha256 = "{WEB_KEY_SHA256}"
flows = ["standalone"]
finapi_clients = ["live", "default"]
"#,
            secret = std::env::temp_dir().join("gib-none").display()
        ));
        std::fs::write(
            std::env::temp_dir().join("gib-none"),
            "sandbox-secret-from-file\n",
        )
        .unwrap();
        let mut vars = valid_env();
        vars.retain(|(k, _)| k != "GIROIDENT_BROKER_AUTH__CALLERS");
        vars.push((
            "GIROIDENT_BROKER_FINAPI__CLIENTS__LIVE__CLIENT_SECRET".into(),
            "live-secret-from-env".into(),
        ));
        let s = Settings::load_with_env(Some(&path), vars).expect("valid");
        let clients = s.finapi_clients();
        let names: Vec<&str> = clients.iter().map(|c| c.name.as_str()).collect();
        assert_eq!(names, ["default", "live", "sandbox"]);
        assert_eq!(clients[0].client_id, "client");
        assert_eq!(clients[0].process_id, "GIROIDENT");
        assert_eq!(
            clients[1].client_secret.expose_secret(),
            "live-secret-from-env"
        );
        assert_eq!(clients[1].process_id, "USER_ONLY");
        assert_eq!(
            clients[2].client_secret.expose_secret(),
            "sandbox-secret-from-file"
        );
        assert_eq!(
            clients[2].process_id, "GIROIDENT",
            "flows.process_id by default"
        );
        assert_eq!(s.auth.callers[0].finapi_client_names(), ["live", "default"]);
        let shown = format!("{s:?}");
        assert!(!shown.contains("secret-from"), "{shown}");
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn every_client_problem_is_reported_with_its_key_path_and_no_secret() {
        let (dir, path) = write_config(&format!(
            r#"
[finapi.clients.live]
client_secret = "file-secret-9"
access_url = "ftp://live.example"
process_controller_url = "https://pc.live.example"
colour = "blue"

[finapi.clients."bad name"]
client_id = "x"
access_url = "https://a.example"
process_controller_url = "https://b.example"

[finapi.clients.default]
client_id = "y"
access_url = "https://a.example"
process_controller_url = "https://b.example"
process_id = "NOT OK"

[server]
drain_secs = "soon"
worker_threads = true

[[auth.callers]]
name = "shop"
key_sha256 = "{WEB_KEY_SHA256}"
flows = ["standalone"]
finapi_clients = ["live", "nowhere"]
"#
        ));
        let mut vars = valid_env();
        vars.retain(|(k, _)| k != "GIROIDENT_BROKER_AUTH__CALLERS");
        vars.push((
            "GIROIDENT_BROKER_LIMITS__MAX_IN_FLIGHT".into(),
            "many".into(),
        ));
        let err = Settings::load_with_env(Some(&path), vars).unwrap_err();
        for key in [
            "finapi.clients.live.client_secret",
            "finapi.clients.live.client_id",
            "finapi.clients.live.access_url",
            "finapi.clients.live.colour",
            "finapi.clients.bad name",
            "finapi.clients.default",
            "finapi.clients.default.process_id",
            "server.drain_secs",
            "server.worker_threads",
            "limits.max_in_flight",
            "auth.callers[0].finapi_clients",
        ] {
            assert!(err.mentions(key), "{key} missing from: {err}");
        }
        let text = err.to_string();
        assert!(
            text.contains("GIROIDENT_BROKER_LIMITS__MAX_IN_FLIGHT"),
            "{text}"
        );
        assert!(text.contains("\"nowhere\""), "{text}");
        assert!(!text.contains("file-secret-9"), "{text}");
        assert!(!text.contains("soon") && !text.contains("many"), "{text}");
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn without_a_default_client_every_caller_names_its_clients() {
        let (dir, path) = write_config(&format!(
            r#"
[finapi.clients.live]
client_id = "live-id"
access_url = "https://live.example"
process_controller_url = "https://pc.live.example"

[[auth.callers]]
name = "shop"
key_sha256 = "{WEB_KEY_SHA256}"
flows = ["standalone"]
"#
        ));
        let vars = env(&[
            ("GIROIDENT_BROKER_FINAPI__CLIENTS__LIVE__CLIENT_SECRET", "s"),
            (
                "GIROIDENT_BROKER_IDENTITIES__PASSWORD_KEY",
                "a-password-key-of-at-least-32-bytes-0123",
            ),
        ]);
        let err = Settings::load_with_env(Some(&path), vars.clone()).unwrap_err();
        assert_eq!(
            err.problems
                .iter()
                .map(|(k, _)| k.as_str())
                .collect::<Vec<_>>(),
            ["auth.callers[0].finapi_clients"],
            "{err}"
        );
        std::fs::write(
            &path,
            std::fs::read_to_string(&path).unwrap() + "finapi_clients = [\"live\"]\n",
        )
        .unwrap();
        let s = Settings::load_with_env(Some(&path), vars).expect("valid");
        assert_eq!(s.finapi.client_names(), ["live"]);
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn wrong_types_inside_a_caller_table_are_named_with_its_index() {
        let err = with_callers(&format!(
            r#"[{{name = "a", key_sha256 = "{WEB_KEY_SHA256}", flows = "access", burst = true}}]"#
        ))
        .unwrap_err();
        assert!(err.mentions("auth.callers[0].burst"), "{err}");
        assert!(err.mentions("auth.callers[0].flows"), "{err}");
    }

    #[test]
    fn secret_is_redacted_in_debug_output() {
        let s = Settings::load_with_env(None, valid_env()).unwrap();
        let shown = format!("{s:?}");
        assert!(!shown.contains("s3cret"), "{shown}");
    }
}
