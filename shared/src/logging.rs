//! Logging set-up, the same for every binary: `tracing` to stderr, filtered by
//! `NEXA_LOG` (an `EnvFilter` directive such as `info` or `nexa_coordinator=debug`).

/// Installs the subscriber; `default` is the filter when `NEXA_LOG` is unset or invalid.
pub fn init(default: &str) {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("NEXA_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default)),
        )
        .with_writer(std::io::stderr)
        .init();
}
