//! Derived credentials of managed identities: a user's password and the digest of a caller's
//! client reference are computed with HMAC-SHA256 (RFC 2104) under the configured password
//! keys, never stored. A copy of the ledger alone reveals no credential and no reference.
//!
//! Rotation: the newest key derives the passwords of new identities; each record keeps the id
//! of its key, and older keys stay configured while identities made with them live. A
//! reference is looked up under every configured key, so rotation does not split one end
//! customer into two identities.

use std::sync::{Arc, RwLock};

use hmac::{Hmac, KeyInit, Mac};
use secrecy::{ExposeSecret, SecretString};
use sha2::Sha256;

use crate::config::to_hex;

/// Shortest key accepted, in bytes: HMAC-SHA256 keys shorter than the hash's 32 bytes weaken
/// it (RFC 2104, section 3).
pub const MIN_KEY_BYTES: usize = 32;

/// Domain separators, so that no derived value can stand in for another.
const PASSWORD_CONTEXT: &[u8] = b"giroident-broker/finapi-user-password/v1\0";
const REFERENCE_CONTEXT: &[u8] = b"giroident-broker/client-reference/v1\0";
const KEY_ID_CONTEXT: &[u8] = b"giroident-broker/key-id/v1";

/// One password key and its id.
pub struct PasswordKey {
    id: String,
    /// HMAC keyed with the key (its inner and outer pads hashed once, RFC 2104), cloned for
    /// each derivation: half the hashing of keying it anew.
    keyed: Hmac<Sha256>,
}

impl std::fmt::Debug for PasswordKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PasswordKey")
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

/// A key shorter than [`MIN_KEY_BYTES`].
#[derive(Debug, thiserror::Error)]
#[error("a password key must be at least {MIN_KEY_BYTES} bytes")]
pub struct KeyTooShort;

impl PasswordKey {
    /// A key from its secret bytes. Its id is 16 hex digits of an HMAC of a fixed text under
    /// the key: it names the key in the ledger without revealing it.
    pub fn new(key: SecretString) -> Result<Self, KeyTooShort> {
        if key.expose_secret().len() < MIN_KEY_BYTES {
            return Err(KeyTooShort);
        }
        // HMAC takes keys of any length (RFC 2104): this cannot fail.
        let keyed = <Hmac<Sha256> as KeyInit>::new_from_slice(key.expose_secret().as_bytes())
            .unwrap_or_else(|_| unreachable!("HMAC accepts any key length"));
        let id = to_hex(&mac(&keyed, &[KEY_ID_CONTEXT])[..8]);
        Ok(Self { id, keyed })
    }

    /// The key's id, as recorded with each identity.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The password of the finAPI user `finapi_user_id`: 64 hex digits (256 bits), within
    /// finAPI's 6 to 128 characters for `password` (POST /api/v2/users).
    pub fn password(&self, finapi_user_id: &str) -> SecretString {
        let digest = mac(
            &self.keyed,
            &[
                PASSWORD_CONTEXT,
                finapi_user_id.to_ascii_lowercase().as_bytes(),
            ],
        );
        SecretString::from(to_hex(&digest))
    }

    /// The digest recorded for `caller`'s `client_reference`: 64 hex digits.
    pub fn reference_digest(&self, caller: &str, client_reference: &str) -> String {
        to_hex(&mac(
            &self.keyed,
            &[
                REFERENCE_CONTEXT,
                caller.as_bytes(),
                b"\0",
                client_reference.as_bytes(),
            ],
        ))
    }
}

fn mac(keyed: &Hmac<Sha256>, parts: &[&[u8]]) -> [u8; 32] {
    let mut mac = keyed.clone();
    for part in parts {
        mac.update(part);
    }
    mac.finalize().into_bytes().into()
}

/// The configured password keys: the newest first, then older ones still needed.
#[derive(Debug)]
pub struct PasswordKeys {
    keys: Vec<Arc<PasswordKey>>,
}

impl PasswordKeys {
    /// The newest key, then older ones.
    pub fn new(newest: PasswordKey, older: Vec<PasswordKey>) -> Self {
        let keys = std::iter::once(newest).chain(older).map(Arc::new).collect();
        Self { keys }
    }

    /// The key new identities use.
    pub fn newest(&self) -> &Arc<PasswordKey> {
        &self.keys[0]
    }

    /// The key with id `id`, if it is still configured.
    pub fn by_id(&self, id: &str) -> Option<&Arc<PasswordKey>> {
        self.keys.iter().find(|key| key.id == id)
    }

    /// Every configured key, the newest first.
    pub fn all(&self) -> &[Arc<PasswordKey>] {
        &self.keys
    }

    /// The keys' ids, the newest first.
    pub fn ids(&self) -> Vec<String> {
        self.keys.iter().map(|key| key.id.clone()).collect()
    }
}

/// The password keys in use, replaceable by a reload (`SIGHUP`) while requests run; a request
/// keeps the keys it started with.
#[derive(Debug)]
pub struct SharedPasswordKeys(RwLock<Arc<PasswordKeys>>);

impl SharedPasswordKeys {
    /// `keys`, to be shared.
    pub fn new(keys: PasswordKeys) -> Self {
        Self(RwLock::new(Arc::new(keys)))
    }

    /// The keys now.
    pub fn current(&self) -> Arc<PasswordKeys> {
        self.0
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
    }

    /// Uses `keys` from now on.
    pub fn replace(&self, keys: PasswordKeys) {
        *self
            .0
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = Arc::new(keys);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(text: &str) -> PasswordKey {
        PasswordKey::new(SecretString::from(text.to_owned())).unwrap()
    }

    #[test]
    fn derivations_are_stable_and_key_bound() {
        let a = key("a-key-of-at-least-thirty-two-bytes!!");
        let b = key("another-key-of-at-least-thirty-two-bytes");
        assert_eq!(
            a.password("gib-1").expose_secret(),
            a.password("GIB-1").expose_secret(),
            "finAPI user ids compare case-insensitively"
        );
        assert_ne!(
            a.password("gib-1").expose_secret(),
            b.password("gib-1").expose_secret()
        );
        assert_eq!(a.password("gib-1").expose_secret().len(), 64);
        assert_ne!(a.id(), b.id());
        assert_eq!(a.id().len(), 16);
        assert_ne!(
            a.reference_digest("web", "c-1"),
            a.reference_digest("app", "c-1")
        );
        // The separator keeps ("ab", "c") and ("a", "bc") apart.
        assert_ne!(a.reference_digest("ab", "c"), a.reference_digest("a", "bc"));
    }

    #[test]
    fn short_keys_are_refused_and_debug_hides_the_key() {
        assert!(PasswordKey::new(SecretString::from("short".to_owned())).is_err());
        let k = key("a-key-of-at-least-thirty-two-bytes!!");
        assert!(!format!("{k:?}").contains("thirty"));
    }
}
