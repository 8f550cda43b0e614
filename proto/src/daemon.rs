//! Plumbing the scheduler and the agent share: reading their TOML
//! configuration, serving gRPC on a listener, and waiting for a stop signal.

use serde::de::DeserializeOwned;
use std::path::{Path, PathBuf};

/// Errors loading a daemon's configuration file; each names the file.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("config file {path}: {message}")]
    Invalid { path: PathBuf, message: String },
}

/// Milliseconds since the Unix epoch: the wall clock both daemons stamp
/// (the scheduler into commands, the agent into its lease file).
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// Read `path` as TOML into `T`, then run `validate`; every failure names the
/// file (and, from toml or `validate`, the key).
pub fn load_toml<T: DeserializeOwned>(
    path: &Path,
    validate: impl FnOnce(&T) -> Result<(), String>,
) -> Result<T, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    parse_toml(&text, path, validate)
}

/// Parse TOML text into `T` and run `validate`; `path` is used in errors.
pub fn parse_toml<T: DeserializeOwned>(
    text: &str,
    path: &Path,
    validate: impl FnOnce(&T) -> Result<(), String>,
) -> Result<T, ConfigError> {
    let invalid = |message: String| ConfigError::Invalid {
        path: path.to_path_buf(),
        message,
    };
    let cfg: T = toml::from_str(text).map_err(|e| invalid(e.to_string().trim_end().to_string()))?;
    validate(&cfg).map_err(invalid)?;
    Ok(cfg)
}

/// Accepted connections with Nagle's algorithm off: small gRPC frames (an
/// assignment, a reply) must not wait for the peer's delayed ACK (~40 ms).
pub fn nodelay(
    listener: tokio::net::TcpListener,
) -> impl tokio_stream::Stream<Item = std::io::Result<tokio::net::TcpStream>> {
    use tokio_stream::StreamExt;
    tokio_stream::wrappers::TcpListenerStream::new(listener).map(|conn| {
        if let Ok(c) = &conn {
            let _ = c.set_nodelay(true);
        }
        conn
    })
}

/// Resolves on Ctrl-C (SIGINT) or SIGTERM.
pub async fn stop_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
    let term = async {
        match term.as_mut() {
            Some(t) => {
                t.recv().await;
            }
            None => std::future::pending().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term => {}
    }
}
