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

/// Whether the daemons' log (on standard output) may use colours: only on
/// a terminal, and never with `NO_COLOR` set (no-color.org), so a log
/// redirected to a file or a journal holds no escape sequences.
pub fn log_colours() -> bool {
    use std::io::IsTerminal;
    colours_for(
        std::io::stdout().is_terminal(),
        std::env::var_os("NO_COLOR").is_some_and(|v| !v.is_empty()),
    )
}

fn colours_for(terminal: bool, no_color: bool) -> bool {
    terminal && !no_color
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

/// What a daemon knows of the other end of an accepted connection. tonic
/// hands it to every request on that connection (in its extensions, inside
/// a `TlsConnectInfo` when TLS is on): see [`PeerInfo::of`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PeerInfo {
    pub remote: Option<std::net::SocketAddr>,
    pub local: Option<std::net::SocketAddr>,
    /// For a peer on this host: the uid that owns its socket, looked up once
    /// when the connection was accepted (not on every request).
    pub uid: Option<u32>,
}

impl PeerInfo {
    /// The connection a request came on, if it was accepted by [`identified`].
    pub fn of<T>(req: &tonic::Request<T>) -> Option<&PeerInfo> {
        let ext = req.extensions();
        ext.get::<PeerInfo>().or_else(|| {
            ext.get::<tonic::transport::server::TlsConnectInfo<PeerInfo>>()
                .map(|t| t.get_ref())
        })
    }

    /// The client certificates of a TLS connection accepted by [`identified`].
    pub fn peer_certs<T>(
        req: &tonic::Request<T>,
    ) -> Option<std::sync::Arc<Vec<tonic::transport::CertificateDer<'static>>>> {
        req.extensions()
            .get::<tonic::transport::server::TlsConnectInfo<PeerInfo>>()?
            .peer_certs()
    }
}

/// An accepted TCP connection carrying its [`PeerInfo`].
pub struct Accepted {
    io: tokio::net::TcpStream,
    info: PeerInfo,
}

impl tonic::transport::server::Connected for Accepted {
    type ConnectInfo = PeerInfo;
    fn connect_info(&self) -> PeerInfo {
        self.info.clone()
    }
}

impl tokio::io::AsyncRead for Accepted {
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.get_mut().io).poll_read(cx, buf)
    }
}

impl tokio::io::AsyncWrite for Accepted {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }
    fn poll_write_vectored(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }
    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

/// Like [`nodelay`], and each connection learns who is calling once, when it
/// is accepted: `uid_of(peer, local)` for loopback callers (the scheduler
/// reads the socket's owner from /proc/net/tcp). Doing this per request cost
/// the scheduler most of its time under load.
pub fn identified(
    listener: tokio::net::TcpListener,
    uid_of: fn(std::net::SocketAddr, std::net::SocketAddr) -> Option<u32>,
) -> impl tokio_stream::Stream<Item = std::io::Result<Accepted>> {
    use tokio_stream::StreamExt;
    nodelay(listener).map(move |conn| {
        let io = conn?;
        let remote = io.peer_addr().ok();
        let local = io.local_addr().ok();
        let uid = match (remote, local) {
            (Some(r), Some(l)) if r.ip().is_loopback() => uid_of(r, l),
            _ => None,
        };
        Ok(Accepted {
            io,
            info: PeerInfo { remote, local, uid },
        })
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn colours_only_on_a_terminal_without_no_color() {
        assert!(colours_for(true, false));
        assert!(!colours_for(false, false), "redirected");
        assert!(!colours_for(true, true), "NO_COLOR");
    }
    use tokio_stream::StreamExt;

    #[tokio::test]
    async fn a_connection_is_identified_once_when_accepted() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mut incoming = Box::pin(identified(listener, |peer, local| {
            // The lookup sees the caller's own address and ours.
            (local.port() != 0 && peer.ip().is_loopback()).then_some(4242)
        }));
        let client = tokio::net::TcpStream::connect(addr).await.unwrap();
        let accepted = incoming.next().await.unwrap().unwrap();
        let info = tonic::transport::server::Connected::connect_info(&accepted);
        assert_eq!(info.uid, Some(4242));
        assert_eq!(info.remote, Some(client.local_addr().unwrap()));
        assert_eq!(info.local, Some(addr));
        let mut req = tonic::Request::new(());
        req.extensions_mut().insert(info.clone());
        assert_eq!(PeerInfo::of(&req), Some(&info));
        assert!(PeerInfo::of(&tonic::Request::new(())).is_none());
    }
}
