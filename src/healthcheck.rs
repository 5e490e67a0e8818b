//! `giroident-broker healthcheck`: one GET against a health endpoint, so that an image without a
//! shell or curl (distroless) can still serve Docker's `HEALTHCHECK`.

use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

use reqwest::{StatusCode, Url};
use rustls::pki_types::CertificateDer;

use crate::telemetry::cause_chain;

/// The broker's liveness endpoint inside its container.
pub const DEFAULT_URL: &str = "http://127.0.0.1:8080/livez";

/// Time budget of the whole check, connection included; well under Docker's default
/// `HEALTHCHECK --timeout` of 30 s so that a hung server counts as unhealthy, not as stuck.
pub const TIMEOUT: Duration = Duration::from_secs(3);

/// Why a health endpoint does not count as healthy.
#[derive(Debug, thiserror::Error)]
pub enum HealthcheckError {
    /// The HTTP client could not be built.
    #[error("cannot build the HTTP client")]
    Client(#[source] reqwest::Error),
    /// No answer: connection refused, reset, or the timeout ran out.
    #[error("no answer from {url}")]
    NoAnswer {
        url: Url,
        #[source]
        source: reqwest::Error,
    },
    /// An answer other than 2xx.
    #[error("{url} answered {status}")]
    Unhealthy { url: Url, status: StatusCode },
}

/// GETs `url` and succeeds on a 2xx answer within `timeout`. Redirects are not followed.
pub async fn check(url: Url, timeout: Duration) -> Result<StatusCode, HealthcheckError> {
    check_trusting(url, timeout, &[]).await
}

/// Like [`check`], an `https` URL's certificate verified against the system's roots plus
/// `extra_roots` (e.g. the simulator's authority, [`crate::tls::read_ca_file`]).
pub async fn check_trusting(
    url: Url,
    timeout: Duration,
    extra_roots: &[CertificateDer<'static>],
) -> Result<StatusCode, HealthcheckError> {
    // reqwest is built without a default TLS provider; an https URL needs one installed.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let extra_roots = extra_roots
        .iter()
        .map(|der| reqwest::Certificate::from_der(der))
        .collect::<Result<Vec<_>, _>>()
        .map_err(HealthcheckError::Client)?;
    let client = reqwest::Client::builder()
        .tls_certs_merge(extra_roots)
        .timeout(timeout)
        .connect_timeout(timeout)
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .map_err(HealthcheckError::Client)?;
    let response = client.get(url.clone()).send().await;
    // The errors print the URL: never its password.
    let mut url = url;
    if url.password().is_some() {
        let _ = url.set_password(None);
    }
    let response = match response {
        Ok(response) => response,
        Err(source) => {
            return Err(HealthcheckError::NoAnswer {
                url,
                source: source.without_url(),
            });
        }
    };
    let status = response.status();
    if status.is_success() {
        Ok(status)
    } else {
        Err(HealthcheckError::Unhealthy { url, status })
    }
}

/// The `healthcheck` subcommand: exit code 0 when healthy, 1 otherwise (an unusable
/// `ca_file` too). Prints the status only, never the body.
pub async fn run(url: Url, ca_file: Option<&Path>) -> ExitCode {
    let extra_roots = match ca_file.map(crate::tls::read_ca_file).transpose() {
        Ok(roots) => roots.unwrap_or_default(),
        Err(err) => {
            eprintln!("unhealthy: --ca-file: {err}");
            return ExitCode::FAILURE;
        }
    };
    match check_trusting(url, TIMEOUT, &extra_roots).await {
        Ok(status) => {
            println!("healthy: {status}");
            ExitCode::SUCCESS
        }
        Err(err) => {
            eprintln!("unhealthy: {}", cause_chain(&err));
            ExitCode::FAILURE
        }
    }
}
