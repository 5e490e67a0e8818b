//! Extra trust anchors for the broker's HTTPS calls to finAPI: a PEM bundle (`finapi.ca_file`)
//! added to the system's roots. There is deliberately nothing here to weaken verification.
//!
//! A leaf module: config validates the file with it at load, and the finAPI client reads it
//! when the broker starts; it knows neither of them.

use std::path::Path;

use rustls::RootCertStore;
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;

/// Largest CA bundle read, in bytes (1 MiB). Debian's whole system bundle is about 220 KiB; a
/// larger file is not a CA bundle.
pub const MAX_CA_FILE_BYTES: u64 = 1024 * 1024;

/// Why a CA bundle cannot be used. The message names the file, never its content.
#[derive(Debug, thiserror::Error)]
pub enum CaFileError {
    /// The file could not be read.
    #[error("cannot read {path}: {kind}")]
    Read {
        path: String,
        kind: std::io::ErrorKind,
    },
    /// The file is over [`MAX_CA_FILE_BYTES`].
    #[error("{path} is larger than {MAX_CA_FILE_BYTES} bytes")]
    TooLarge { path: String },
    /// The PEM text is malformed (a section without its end line, bad base64).
    #[error("{path} is not a PEM bundle: {detail}")]
    Pem { path: String, detail: String },
    /// The file holds no `CERTIFICATE` section.
    #[error("{path} holds no PEM CERTIFICATE")]
    Empty { path: String },
    /// A certificate cannot serve as a trust anchor (not a parseable X.509 certificate).
    #[error("certificate {index} of {path} is not a usable CA certificate: {detail}")]
    Certificate {
        path: String,
        /// 1 for the first certificate of the file.
        index: usize,
        detail: String,
    },
}

/// Reads the `CERTIFICATE` sections of the PEM bundle at `path` (RFC 7468), each checked to be
/// usable as a trust anchor. Other sections (a stray key, say) are ignored. Errors: the file
/// cannot be read, is over [`MAX_CA_FILE_BYTES`], is no PEM, holds no certificate, or holds one
/// that does not parse.
pub fn read_ca_file(path: &Path) -> Result<Vec<CertificateDer<'static>>, CaFileError> {
    let shown = path.display().to_string();
    let read_error = |e: std::io::Error| CaFileError::Read {
        path: shown.clone(),
        kind: e.kind(),
    };
    let size = std::fs::metadata(path).map_err(read_error)?.len();
    if size > MAX_CA_FILE_BYTES {
        return Err(CaFileError::TooLarge { path: shown });
    }
    let text = std::fs::read(path).map_err(read_error)?;
    let certs = CertificateDer::pem_slice_iter(&text)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| CaFileError::Pem {
            path: shown.clone(),
            detail: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(CaFileError::Empty { path: shown });
    }
    // The same parse the verifier makes of its roots, so that a bundle accepted here is one
    // the HTTP client accepts too.
    let mut store = RootCertStore::empty();
    for (i, cert) in certs.iter().enumerate() {
        store
            .add(cert.clone())
            .map_err(|e| CaFileError::Certificate {
                path: shown.clone(),
                index: i + 1,
                detail: e.to_string(),
            })?;
    }
    Ok(certs)
}
