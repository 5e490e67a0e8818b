//! Logging: JSON lines or human-readable text, filtered in `RUST_LOG` syntax.

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;
use tracing_subscriber::fmt::MakeWriter;

use crate::config::LogFormat;

/// Installs the global subscriber writing to standard error. `RUST_LOG`, when set, overrides
/// `filter`. Returns false if a subscriber was already installed.
pub fn init(format: LogFormat, filter: &str) -> bool {
    init_with_writer(format, filter, std::io::stderr)
}

/// Like [`init`], with another writer (tests capture logs this way).
pub fn init_with_writer<W>(format: LogFormat, filter: &str, writer: W) -> bool
where
    W: for<'a> MakeWriter<'a> + Send + Sync + 'static,
{
    let filter = std::env::var("RUST_LOG")
        .ok()
        .and_then(|f| f.parse::<EnvFilter>().ok())
        .unwrap_or_else(|| EnvFilter::new(filter));
    let json = match format {
        LogFormat::Json => true,
        LogFormat::Pretty => false,
        LogFormat::Auto => !std::io::stderr().is_terminal(),
    };
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(writer);
    if json {
        builder
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .with_span_list(false)
            .try_init()
            .is_ok()
    } else {
        builder.try_init().is_ok()
    }
}
