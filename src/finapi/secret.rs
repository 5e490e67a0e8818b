//! The secret of one finAPI client while the broker runs: replaced by a reload (`SIGHUP`), and
//! re-read from its file when finAPI refuses it, since a secret rotated at finAPI
//! (`changeClientCredentials`) is refused with `401 invalid_client` from then on (finAPI
//! reference, "Client secret rotation").

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Instant;

use secrecy::{ExposeSecret, SecretString};

use crate::telemetry::metrics::SECRET_REREADS;

/// One value of a client secret. Calls keep the version they sent, so that a refusal can be
/// told apart from one of a secret already replaced.
pub struct SecretVersion {
    secret: SecretString,
    file: Option<PathBuf>,
    generation: u64,
}

impl SecretVersion {
    /// The secret.
    pub fn secret(&self) -> &SecretString {
        &self.secret
    }
}

impl std::fmt::Debug for SecretVersion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SecretVersion")
            .field("file", &self.file)
            .field("generation", &self.generation)
            .finish_non_exhaustive()
    }
}

/// The secret of the finAPI client `name` (`default` for the single-client settings), and the
/// file it comes from, if any (`finapi.client_secret_file`; a secret from the environment
/// cannot change while the process runs).
pub struct ClientSecret {
    name: String,
    current: RwLock<Arc<SecretVersion>>,
    /// When the last re-read after a refusal started; held while one runs, so that concurrent
    /// refusals share one read of the file.
    last_reread: tokio::sync::Mutex<Option<Instant>>,
    rereads: AtomicU64,
}

impl std::fmt::Debug for ClientSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientSecret")
            .field("name", &self.name)
            .field("current", &*self.current())
            .finish_non_exhaustive()
    }
}

impl ClientSecret {
    /// The secret of client `name`, read from `file` if given (the file is only read again on
    /// a refusal).
    pub fn new(name: &str, secret: SecretString, file: Option<PathBuf>) -> Self {
        Self {
            name: name.to_owned(),
            current: RwLock::new(Arc::new(SecretVersion {
                secret,
                file,
                generation: 0,
            })),
            last_reread: tokio::sync::Mutex::new(None),
            rereads: AtomicU64::new(0),
        }
    }

    /// The client's name, for logs and metrics.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The secret to send now.
    pub fn current(&self) -> Arc<SecretVersion> {
        self.current
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
    }

    /// How often the file was read again after a refusal (for tests and docs).
    pub fn rereads(&self) -> u64 {
        self.rereads.load(Ordering::Relaxed)
    }

    /// Takes `secret` (and the file it now comes from) as the current secret, as a reload
    /// does. Returns whether the secret's value changed.
    pub fn replace(&self, secret: SecretString, file: Option<PathBuf>) -> bool {
        let mut current = self
            .current
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let changed = current.secret.expose_secret() != secret.expose_secret();
        *current = Arc::new(SecretVersion {
            secret,
            file,
            generation: current.generation + u64::from(changed),
        });
        changed
    }

    /// finAPI refused `rejected`, sent at `sent_at`: the secret to try once more, if there is
    /// a newer one. That is the current secret if it replaced `rejected` meanwhile; otherwise
    /// the file is read again, unless a read that started after `sent_at` found nothing new
    /// (so a burst of refused calls reads the file once). `None`: the refusal stands.
    pub async fn newer_after_refusal(
        &self,
        rejected: &SecretVersion,
        sent_at: Instant,
    ) -> Option<Arc<SecretVersion>> {
        let mut last_reread = self.last_reread.lock().await;
        let current = self.current();
        if current.generation != rejected.generation {
            return Some(current);
        }
        if last_reread.is_some_and(|at| at >= sent_at) {
            return None;
        }
        let path = current.file.clone()?;
        *last_reread = Some(Instant::now());
        self.rereads.fetch_add(1, Ordering::Relaxed);
        let read = tokio::task::spawn_blocking({
            let path = path.clone();
            move || crate::config::read_secret_file(&path)
        })
        .await;
        let outcome = match read {
            Ok(Ok(secret)) if secret.expose_secret() != current.secret.expose_secret() => {
                self.replace(secret, Some(path));
                tracing::info!(
                    finapi_client = %self.name,
                    "finAPI refused the client secret; its file holds a new one, which is used from now on"
                );
                "changed"
            }
            Ok(Ok(_)) => {
                tracing::warn!(
                    finapi_client = %self.name,
                    "finAPI refused the client secret, and its file still holds the same one"
                );
                "unchanged"
            }
            Ok(Err(problem)) => {
                tracing::warn!(
                    finapi_client = %self.name,
                    file = %path.display(),
                    problem,
                    "finAPI refused the client secret, and its file cannot be read again"
                );
                "failed"
            }
            Err(_) => "failed",
        };
        metrics::counter!(SECRET_REREADS, "finapi_client" => self.name.clone(), "outcome" => outcome)
            .increment(1);
        let newer = self.current();
        (newer.generation != rejected.generation).then_some(newer)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secret(text: &str) -> SecretString {
        SecretString::from(text.to_owned())
    }

    #[tokio::test]
    async fn a_refusal_reads_the_file_once_and_takes_a_new_secret() {
        let path = std::env::temp_dir().join(format!(
            "giroident-broker-secret-{}",
            uuid::Uuid::new_v4().simple()
        ));
        std::fs::write(&path, "old\n").unwrap();
        let client = ClientSecret::new("default", secret("old"), Some(path.clone()));
        let sent = Instant::now();
        let refused = client.current();
        // Unchanged: the refusal stands, and another refusal of a call sent before that read
        // does not read the file again.
        assert!(client.newer_after_refusal(&refused, sent).await.is_none());
        assert!(client.newer_after_refusal(&refused, sent).await.is_none());
        assert_eq!(client.rereads(), 1);
        std::fs::write(&path, "new\n").unwrap();
        let sent = Instant::now();
        let newer = client.newer_after_refusal(&refused, sent).await.unwrap();
        assert_eq!(newer.secret().expose_secret(), "new");
        // A call that sent the old secret before the read gets the new one without a read.
        let again = client.newer_after_refusal(&refused, sent).await.unwrap();
        assert_eq!(again.secret().expose_secret(), "new");
        assert_eq!(client.rereads(), 2);
        assert!(!format!("{client:?}").contains("new"));
        std::fs::remove_file(path).unwrap();
    }

    #[tokio::test]
    async fn a_secret_without_a_file_is_never_read_again() {
        let client = ClientSecret::new("default", secret("env"), None);
        let refused = client.current();
        assert!(
            client
                .newer_after_refusal(&refused, Instant::now())
                .await
                .is_none()
        );
        assert!(client.replace(secret("other"), None));
        assert!(!client.replace(secret("other"), None));
    }
}
