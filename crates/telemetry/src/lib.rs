//! Logging and tracing set-up, shared by the binary and the tests.

use std::io::IsTerminal;

use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{fmt, EnvFilter};

#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    #[error("log.filter (CALLBOARD_LOG): {0}")]
    Filter(String),
    #[error("a global tracing subscriber is already set")]
    AlreadySet,
}

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Text,
    Json,
}

/// Installs the global subscriber: `filter` in `RUST_LOG` syntax, to stderr.
pub fn init(filter: &str, format: Format) -> Result<(), TelemetryError> {
    let filter = EnvFilter::try_new(filter).map_err(|e| TelemetryError::Filter(e.to_string()))?;
    let registry = tracing_subscriber::registry().with(filter);
    let result = match format {
        // Colours only for a terminal: escape codes in files and pipes are
        // noise, and cost formatting time on every span.
        Format::Text => registry
            .with(fmt::layer().with_ansi(std::io::stderr().is_terminal()).with_writer(std::io::stderr))
            .try_init(),
        Format::Json => {
            registry.with(fmt::layer().json().with_current_span(true).with_writer(std::io::stderr)).try_init()
        }
    };
    result.map_err(|_| TelemetryError::AlreadySet)
}

/// For tests: logs only when `TEST_LOG` is set (its value is the filter),
/// at most once per process.
pub fn init_for_tests() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        if let Ok(filter) = std::env::var("TEST_LOG") {
            let filter =
                if filter.is_empty() || filter == "1" || filter == "true" { "info".to_string() } else { filter };
            let _ = init(&filter, Format::Text);
        }
    });
}
