//! HTTPS for the simulator: a certificate and key from PEM files, or a certificate authority
//! made on the spot that issues the server's certificate (rcgen), so that the broker reaches
//! the simulator over verified TLS exactly as it reaches finAPI.
//!
//! ALPN (RFC 7301) offers `h2` and `http/1.1`, as finAPI's load balancers may; a client that
//! offers no ALPN or only `http/1.1` gets HTTP/1.1. [`SimTls::http1_only`] stands for a server
//! that offers `http/1.1` alone.

use std::fmt;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

/// The names a generated server certificate is valid for unless told otherwise.
pub const LOCAL_NAMES: [&str; 2] = ["127.0.0.1", "localhost"];

/// How long generated certificates are valid from their making: a year, enough for any demo
/// or test run, short enough that a forgotten file does not stay trusted for long.
const GENERATED_VALIDITY: Duration = Duration::from_secs(365 * 24 * 3600);

/// How far back generated certificates are valid, for clocks a little behind.
const CLOCK_SKEW: Duration = Duration::from_secs(3600);

/// Why the simulator's TLS could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum SimTlsError {
    /// A PEM file could not be read.
    #[error("cannot read {path}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    /// The certificate PEM holds no certificate, or is malformed.
    #[error("the certificate PEM holds no usable certificate: {0}")]
    Certificate(String),
    /// The key PEM holds no private key, or is malformed.
    #[error("the key PEM holds no usable private key: {0}")]
    Key(String),
    /// rustls refused the certificate and key (a key that does not match, say).
    #[error("the certificate and key cannot serve TLS")]
    Config(#[source] rustls::Error),
    /// rcgen could not make a key or certificate.
    #[error("cannot generate a certificate")]
    Generate(#[source] rcgen::Error),
}

/// A server certificate chain and its key, ready to serve HTTPS.
#[derive(Clone)]
pub struct SimTls {
    config: Arc<rustls::ServerConfig>,
}

impl fmt::Debug for SimTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The key stays out of every debug print.
        f.debug_struct("SimTls")
            .field("alpn", &self.config.alpn_protocols)
            .finish_non_exhaustive()
    }
}

impl SimTls {
    /// From PEM text: the server certificate first, then any intermediates (RFC 7468
    /// `CERTIFICATE` sections), and its private key (PKCS#8, PKCS#1 or SEC1).
    pub fn from_pem(cert_chain: &[u8], key: &[u8]) -> Result<Self, SimTlsError> {
        let chain = CertificateDer::pem_slice_iter(cert_chain)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| SimTlsError::Certificate(e.to_string()))?;
        if chain.is_empty() {
            return Err(SimTlsError::Certificate("no CERTIFICATE section".into()));
        }
        let key =
            PrivateKeyDer::from_pem_slice(key).map_err(|e| SimTlsError::Key(e.to_string()))?;
        Ok(Self {
            config: Arc::new(server_config(chain, key)?),
        })
    }

    /// From the PEM files `cert` (chain) and `key`, as [`SimTls::from_pem`] reads them.
    pub fn from_pem_files(cert: &Path, key: &Path) -> Result<Self, SimTlsError> {
        let read = |path: &Path| {
            std::fs::read(path).map_err(|source| SimTlsError::Read {
                path: path.display().to_string(),
                source,
            })
        };
        Self::from_pem(&read(cert)?, &read(key)?)
    }

    /// The same certificate, offering only `http/1.1` by ALPN (a finAPI front without HTTP/2).
    pub fn http1_only(self) -> Self {
        let mut config = (*self.config).clone();
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Self {
            config: Arc::new(config),
        }
    }

    /// The ALPN protocols offered, most preferred first (`h2`, `http/1.1`).
    pub fn alpn_protocols(&self) -> Vec<String> {
        self.config
            .alpn_protocols
            .iter()
            .map(|p| String::from_utf8_lossy(p).into_owned())
            .collect()
    }

    pub(super) fn acceptor(&self) -> tokio_rustls::TlsAcceptor {
        tokio_rustls::TlsAcceptor::from(self.config.clone())
    }
}

/// The rustls server configuration: ring, TLS 1.2 and 1.3, no client certificates, ALPN `h2`
/// then `http/1.1`.
fn server_config(
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
) -> Result<rustls::ServerConfig, SimTlsError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(SimTlsError::Config)?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .map_err(SimTlsError::Config)?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(config)
}

/// A certificate authority made on the spot (ECDSA P-256, valid for a year), which issues
/// server certificates for the simulator. Its certificate ([`SimCa::cert_pem`]) is what a
/// broker trusts through `finapi.ca_file`; its key never leaves the process.
pub struct SimCa {
    issuer: Issuer<'static, KeyPair>,
    cert_pem: String,
}

impl fmt::Debug for SimCa {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SimCa").finish_non_exhaustive()
    }
}

impl SimCa {
    /// A fresh authority named "giroident-broker simulator CA" and a random suffix: two
    /// authorities never share a name, so a client that trusts one finds the other unknown.
    pub fn generate() -> Result<Self, SimTlsError> {
        let key = KeyPair::generate().map_err(SimTlsError::Generate)?;
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        let suffix = uuid::Uuid::new_v4().simple().to_string();
        params.distinguished_name.push(
            DnType::CommonName,
            format!("giroident-broker simulator CA {}", &suffix[..12]),
        );
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let now = SystemTime::now();
        params.not_before = (now - CLOCK_SKEW).into();
        params.not_after = (now + GENERATED_VALIDITY).into();
        let cert = params.self_signed(&key).map_err(SimTlsError::Generate)?;
        Ok(Self {
            issuer: Issuer::new(params, key),
            cert_pem: cert.pem(),
        })
    }

    /// The authority's certificate, PEM: the file a broker's `finapi.ca_file` names.
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// A server certificate for `names` (IP addresses or DNS names), valid for a year from
    /// now, with its fresh key.
    pub fn issue(&self, names: &[&str]) -> Result<SimTls, SimTlsError> {
        let now = SystemTime::now();
        self.issue_valid(names, now - CLOCK_SKEW, now + GENERATED_VALIDITY)
    }

    /// A server certificate for `names`, valid from `not_before` to `not_after` (tests make
    /// expired ones with it).
    pub fn issue_valid(
        &self,
        names: &[&str],
        not_before: SystemTime,
        not_after: SystemTime,
    ) -> Result<SimTls, SimTlsError> {
        let key = KeyPair::generate().map_err(SimTlsError::Generate)?;
        let names: Vec<String> = names.iter().map(|&n| n.to_owned()).collect();
        let mut params = CertificateParams::new(names).map_err(SimTlsError::Generate)?;
        params
            .distinguished_name
            .push(DnType::CommonName, "giroident-broker simulator");
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.use_authority_key_identifier_extension = true;
        params.not_before = not_before.into();
        params.not_after = not_after.into();
        let cert = params
            .signed_by(&key, &self.issuer)
            .map_err(SimTlsError::Generate)?;
        let key = PrivateKeyDer::from(PrivatePkcs8KeyDer::from(key.serialize_der()));
        Ok(SimTls {
            config: Arc::new(server_config(vec![cert.der().clone()], key)?),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pem_without_certificate_or_key_is_refused() {
        let ca = SimCa::generate().unwrap();
        let err = SimTls::from_pem(b"", b"").unwrap_err();
        assert!(matches!(err, SimTlsError::Certificate(_)), "{err}");
        let err = SimTls::from_pem(ca.cert_pem().as_bytes(), b"no key").unwrap_err();
        assert!(matches!(err, SimTlsError::Key(_)), "{err}");
    }
}
