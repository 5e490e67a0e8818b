//! Reloading the secrets and the callers while the broker runs (`SIGHUP`).
//!
//! A reload runs the normal loader again (the same file, the same environment), so every
//! secret file is read anew and validated exactly as at start. Then only the parts that may
//! change at run time are swapped in: the finAPI client secret, the callers (their keys, flows,
//! limits and retentions, with `limits.caller_rate_per_sec` and `limits.caller_burst`) and the
//! identity password keys. Any other setting that differs is named in a warning: it takes
//! effect at the next start. A reload with any problem changes nothing and names every problem
//! in one log line.

use std::sync::Arc;

use rustls::pki_types::CertificateDer;

use crate::api::auth::Callers;
use crate::config::DEFAULT_CLIENT;
use crate::config::{ConfigError, Settings};
use crate::flows::Flows;
use crate::startup::{password_keys, retention_by_caller};
use crate::telemetry::metrics::CONFIG_RELOADS;

/// What a successful reload changed: names only, never a value.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Reloaded {
    /// Callers added.
    pub callers_added: Vec<String>,
    /// Callers removed (their keys answer `401` from now on).
    pub callers_removed: Vec<String>,
    /// Callers whose flows or rate limits changed.
    pub callers_updated: Vec<String>,
    /// The secrets whose value changed, by setting: `finapi.client_secret` (client `default`),
    /// `finapi.clients.NAME.client_secret`,
    /// `auth.callers.NAME.key`, `identities.password_key`,
    /// `identities.previous_password_keys`.
    pub secrets_changed: Vec<String>,
    /// Settings that differ from the running ones but take effect only after a restart.
    pub restart_needed: Vec<String>,
}

/// Applies reloaded settings to a running broker. One per broker; reloads run one at a time.
pub struct Reloader {
    /// The settings the broker started with: what settings needing a restart are compared to.
    started: Settings,
    /// The CA bundles the finAPI clients were built with, by file: a bundle rewritten in place
    /// (a ConfigMap updated) is not taken by a reload either, and must be named as such.
    started_ca_files: Vec<(std::path::PathBuf, Option<Vec<CertificateDer<'static>>>)>,
    callers: Arc<Callers>,
    flows: Arc<Flows>,
    /// Keeps two reloads from interleaving.
    running: tokio::sync::Mutex<()>,
}

impl Reloader {
    /// A reloader for the broker built from `started`.
    pub fn new(started: Settings, callers: Arc<Callers>, flows: Arc<Flows>) -> Self {
        let mut started_ca_files = Vec::new();
        for path in started
            .finapi_clients()
            .into_iter()
            .filter_map(|c| c.ca_file)
        {
            if !started_ca_files.iter().any(|(known, _)| *known == path) {
                let certs = crate::tls::read_ca_file(&path).ok();
                started_ca_files.push((path, certs));
            }
        }
        Self {
            started,
            started_ca_files,
            callers,
            flows,
            running: tokio::sync::Mutex::new(()),
        }
    }

    /// Applies what the loader made of the configuration now, logs the outcome (one line for
    /// a rejection, listing every problem; one for the changes; one warning naming the
    /// settings that need a restart) and counts it in `broker_config_reloads_total`.
    pub async fn reload(
        &self,
        loaded: Result<Settings, ConfigError>,
    ) -> Result<Reloaded, ConfigError> {
        let _one_at_a_time = self.running.lock().await;
        let result = match loaded {
            Ok(settings) => self.apply(settings).await,
            Err(err) => Err(err),
        };
        let outcome = if result.is_ok() { "ok" } else { "rejected" };
        metrics::counter!(CONFIG_RELOADS, "outcome" => outcome).increment(1);
        match &result {
            Err(err) => {
                let problems = err
                    .problems
                    .iter()
                    .map(|(key, problem)| format!("{key}: {problem}"))
                    .collect::<Vec<_>>()
                    .join("; ");
                tracing::error!(
                    problems,
                    "configuration reload rejected: the running configuration stays"
                );
            }
            Ok(done) => {
                tracing::info!(
                    callers_added = %done.callers_added.join(","),
                    callers_removed = %done.callers_removed.join(","),
                    callers_updated = %done.callers_updated.join(","),
                    secrets_changed = %done.secrets_changed.join(","),
                    "configuration reloaded"
                );
                if !done.restart_needed.is_empty() {
                    tracing::warn!(
                        keys = %done.restart_needed.join(","),
                        "changed settings take effect only after a restart"
                    );
                }
            }
        }
        result
    }

    /// Checks what cannot be checked by the loader alone, then swaps the reloadable parts in.
    async fn apply(&self, mut settings: Settings) -> Result<Reloaded, ConfigError> {
        self.check_clients_running(&settings)?;
        let keys = password_keys(&settings)?;
        let running_keys = self.flows.password_keys();
        let dropped: Vec<String> = running_keys
            .ids()
            .into_iter()
            .filter(|id| keys.by_id(id).is_none())
            .collect();
        if !dropped.is_empty() {
            self.check_unused(&dropped).await?;
        }

        let mut done = Reloaded {
            restart_needed: restart_needed(&self.started, &settings),
            ..Reloaded::default()
        };
        done.restart_needed
            .extend(self.rewritten_ca_files(&settings));
        // Switching authentication on or off is no reload's business.
        settings.auth.disabled = self.started.auth.disabled;
        let callers = self.callers.replace(&settings);
        self.flows
            .replace_retention_by_caller(retention_by_caller(&settings));
        done.callers_added = callers.added;
        done.callers_removed = callers.removed;
        done.callers_updated = callers.updated;
        done.secrets_changed = callers
            .key_changed
            .iter()
            .map(|name| format!("auth.callers.{name}.key"))
            .collect();

        for client in settings.finapi_clients() {
            if let Some(running) = self.flows.client_secret(&client.name)
                && running.replace(client.client_secret, client.client_secret_file)
            {
                done.secrets_changed.push(
                    if client.name == DEFAULT_CLIENT && settings.finapi.has_single_client() {
                        "finapi.client_secret".to_owned()
                    } else {
                        format!("finapi.clients.{}.client_secret", client.name)
                    },
                );
            }
        }

        let (old_ids, new_ids) = (running_keys.ids(), keys.ids());
        if old_ids.first() != new_ids.first() {
            done.secrets_changed
                .push("identities.password_key".to_owned());
        }
        if old_ids.get(1..) != new_ids.get(1..) {
            done.secrets_changed
                .push("identities.previous_password_keys".to_owned());
        }
        self.flows.replace_password_keys(keys);
        Ok(done)
    }

    /// The `ca_file` keys whose file, under the name the client started with, now holds other
    /// certificates than at start (a changed name is already named with its client).
    fn rewritten_ca_files(&self, settings: &Settings) -> Vec<String> {
        let started = self.started.finapi_clients();
        let mut keys = Vec::new();
        for client in settings.finapi_clients() {
            let Some(path) = &client.ca_file else {
                continue;
            };
            let same_file = started
                .iter()
                .any(|old| old.name == client.name && old.ca_file.as_ref() == Some(path));
            let Some((_, at_start)) = self.started_ca_files.iter().find(|(p, _)| p == path) else {
                continue;
            };
            if same_file && *at_start != crate::tls::read_ca_file(path).ok() {
                keys.push(
                    if client.name == DEFAULT_CLIENT && settings.finapi.has_single_client() {
                        "finapi.ca_file".to_owned()
                    } else {
                        format!("finapi.clients.{}.ca_file", client.name)
                    },
                );
            }
        }
        keys
    }

    /// Refuses a reload whose callers name a finAPI client the running broker lacks: the
    /// clients' upstreams are built at start, so a client added since needs a restart.
    fn check_clients_running(&self, settings: &Settings) -> Result<(), ConfigError> {
        let running: Vec<&str> = self.flows.finapi_clients().map(|name| &**name).collect();
        let problems: Vec<(String, String)> = settings
            .auth
            .callers
            .iter()
            .enumerate()
            .flat_map(|(index, caller)| {
                caller
                    .finapi_client_names()
                    .into_iter()
                    .filter(|name| !running.contains(&name.as_str()))
                    .map(move |name| {
                        (
                            format!("auth.callers[{index}].finapi_clients"),
                            format!(
                                "finAPI client {name} is not running: a client added to \
                                 finapi.clients takes effect only after a restart"
                            ),
                        )
                    })
            })
            .collect();
        if problems.is_empty() {
            Ok(())
        } else {
            Err(ConfigError { problems })
        }
    }

    /// Refuses a reload that drops a password key live identities were made with: their
    /// passwords could no longer be derived, so they could neither log in nor be deleted.
    async fn check_unused(&self, dropped: &[String]) -> Result<(), ConfigError> {
        const KEY: &str = "identities.previous_password_key_files";
        let in_use = self.flows.password_keys_in_use().await.map_err(|err| {
            tracing::warn!(error = %crate::telemetry::cause_chain(&err),
                "cannot tell whether a dropped password key is still used");
            ConfigError::single(
                KEY,
                "a password key is left out and the ledger cannot say whether identities still use it",
            )
        })?;
        let problems: Vec<(String, String)> = in_use
            .iter()
            .filter(|(id, count)| *count > 0 && dropped.contains(id))
            .map(|(id, count)| {
                (
                    KEY.to_owned(),
                    format!(
                        "password key {id} is left out but {count} live identities were made \
                         with it: keep its file listed until they are deleted"
                    ),
                )
            })
            .collect();
        if problems.is_empty() {
            Ok(())
        } else {
            Err(ConfigError { problems })
        }
    }
}

/// The settings that differ between `running` and `loaded` and that a reload does not apply.
/// Secrets are compared by value and named only.
pub fn restart_needed(running: &Settings, loaded: &Settings) -> Vec<String> {
    use secrecy::ExposeSecret;
    let mut keys = Vec::new();
    macro_rules! compare {
        ($section:ident: $($field:ident),+ $(,)?) => {
            $(
                if format!("{:?}", running.$section.$field) != format!("{:?}", loaded.$section.$field) {
                    keys.push(concat!(stringify!($section), ".", stringify!($field)).to_owned());
                }
            )+
        };
    }
    compare!(server: listen, drain_secs, request_timeout_secs, worker_threads);
    compare!(admin: listen);
    compare!(auth: disabled);
    compare!(limits: max_body_bytes, read_timeout_secs, max_in_flight);
    compare!(finapi: access_url, process_controller_url, client_id, ca_file, allow_insecure_http,
        http2, connect_timeout_ms, request_timeout_ms);
    // A named client's hosts, id, processId and authority are built into its upstream at start.
    let (old_clients, new_clients) = (running.finapi_clients(), loaded.finapi_clients());
    // The client `default` of the single-client keys is compared key by key above; a
    // `[finapi.clients.default]` table is a table like any other.
    let is_table = |settings: &Settings, name: &str| {
        !(name == DEFAULT_CLIENT && settings.finapi.has_single_client())
    };
    for new in &new_clients {
        let old = old_clients.iter().find(|old| old.name == new.name);
        let same = old.is_some_and(|old| {
            (
                &old.client_id,
                &old.access_url,
                &old.process_controller_url,
                &old.process_id,
                &old.ca_file,
            ) == (
                &new.client_id,
                &new.access_url,
                &new.process_controller_url,
                &new.process_id,
                &new.ca_file,
            )
        });
        if !same && is_table(loaded, &new.name) {
            keys.push(format!("finapi.clients.{}", new.name));
        }
    }
    for old in &old_clients {
        if is_table(running, &old.name) && !new_clients.iter().any(|new| new.name == old.name) {
            keys.push(format!("finapi.clients.{}", old.name));
        }
    }
    compare!(flows: default_flow, process_id, invalidate_process_token);
    compare!(token_cache: refresh_ahead_secs);
    compare!(log: format, filter);
    compare!(resilience: max_attempts, base_backoff_ms, max_backoff_ms, max_retry_after_ms,
        session_budget_ms, breaker_failure_threshold, breaker_cooldown_ms);
    compare!(identities: database_url_file, database_max_connections, sqlite_synchronous, retention_secs,
        reaper_interval_secs, orphan_min_age_secs, reserved_intents);
    compare!(tracing: endpoint, traces_endpoint, service_name, sampler, sampler_arg, timeout_ms,
        max_queue_size, propagate_to_finapi);
    for (key, old, new) in [
        (
            "identities.database_url",
            &running.identities.database_url,
            &loaded.identities.database_url,
        ),
        (
            "tracing.headers",
            &running.tracing.headers,
            &loaded.tracing.headers,
        ),
    ] {
        if old.expose_secret() != new.expose_secret() {
            keys.push(key.to_owned());
        }
    }
    keys
}
