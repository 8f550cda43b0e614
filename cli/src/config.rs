//! Where the scheduler is: `--addr`, then `MUSTER_ADDR`, then a config file,
//! then the address `muster dev` listens on.
//!
//! The config file is TOML with the keys `addr`, `token_file` and a `[tls]`
//! table (`ca`, `cert`, `key`: the user's certificate for mutual TLS).
//! Without `--config` the CLI looks at `$XDG_CONFIG_HOME/muster/config.toml`
//! (or `~/.config/muster/config.toml`), then `/etc/muster/cli.toml`, and uses
//! the first that exists. A file named by `--config` must exist. For the
//! address, the file is only read when neither the flag nor the environment
//! gives one, so a broken file never gets in the way of an explicit
//! `--addr`; credentials (`[tls]`, `token_file`) are read from it for every
//! command that talks to the cluster.
//!
//! A token file must not be readable by group or others ([`read_token_file`]).

use std::ffi::OsString;
use std::path::{Path, PathBuf};

use serde::Deserialize;

/// Where `muster dev` listens, and where the CLI looks when told nothing else.
pub const DEFAULT_ADDR: &str = "http://127.0.0.1:7470";

/// The system-wide config file.
pub const SYSTEM_CONFIG: &str = "/etc/muster/cli.toml";

/// A config file that cannot be used.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {reason}")]
    Read { path: String, reason: String },
    #[error("config file {path}: {message}")]
    Parse { path: String, message: String },
    #[error("invalid scheduler address {addr:?} (from {origin}): {reason}")]
    BadAddr {
        addr: String,
        origin: String,
        reason: String,
    },
}

/// The CLI's config file.
#[derive(Debug, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ConfigFile {
    /// Scheduler address, `http://host:port` or `host:port`.
    pub addr: Option<String>,
    /// File holding this user's token (mode 0600).
    pub token_file: Option<PathBuf>,
    /// TLS: `[tls] ca` (the cluster CA), and optionally `cert` and `key` (a
    /// `user:NAME` certificate; without one, authenticate with a token).
    pub tls: Option<muster_proto::tls::ClientTlsFiles>,
}

/// The config files to try, in order, when `--config` is not given.
pub fn default_config_paths(
    xdg_config_home: Option<OsString>,
    home: Option<OsString>,
) -> Vec<PathBuf> {
    let user_dir = match (xdg_config_home, home) {
        (Some(xdg), _) if !xdg.is_empty() => Some(PathBuf::from(xdg)),
        (_, Some(home)) if !home.is_empty() => Some(PathBuf::from(home).join(".config")),
        _ => None,
    };
    user_dir
        .map(|d| d.join("muster").join("config.toml"))
        .into_iter()
        .chain(std::iter::once(PathBuf::from(SYSTEM_CONFIG)))
        .collect()
}

/// Parses config text; `path` is only used in messages.
pub fn parse_config(path: &str, text: &str) -> Result<ConfigFile, ConfigError> {
    toml::from_str(text).map_err(|e| {
        let start = e.span().map_or(0, |s| s.start).min(text.len());
        let line = text.get(..start).unwrap_or("").matches('\n').count() + 1;
        ConfigError::Parse {
            path: path.to_string(),
            message: format!("line {line}: {}", e.message().trim().replace('\n', " ")),
        }
    })
}

/// Reads a config file.
pub fn load_config(path: &Path) -> Result<ConfigFile, ConfigError> {
    let shown = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|e| ConfigError::Read {
        path: shown.clone(),
        reason: e.to_string(),
    })?;
    parse_config(&shown, &text)
}

/// The first config file that exists: `explicit` if given (it must exist),
/// else the default paths; with its path.
pub fn config_from_files(
    explicit: Option<&Path>,
    defaults: &[PathBuf],
) -> Result<Option<(ConfigFile, PathBuf)>, ConfigError> {
    let path = match explicit {
        Some(p) => Some(p.to_path_buf()),
        None => defaults.iter().find(|p| p.is_file()).cloned(),
    };
    let Some(path) = path else { return Ok(None) };
    Ok(Some((load_config(&path)?, path)))
}

/// Read a token file, refusing one that group or others may read.
pub fn read_token_file(path: &Path) -> Result<String, String> {
    use std::os::unix::fs::PermissionsExt as _;
    let meta = std::fs::metadata(path)
        .map_err(|e| format!("cannot read token file {}: {e}", path.display()))?;
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(format!(
            "token file {} has mode {mode:04o}: group or others may read it; \
             run 'chmod 600 {}'",
            path.display(),
            path.display()
        ));
    }
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read token file {}: {e}", path.display()))?;
    let token = text.trim().to_string();
    if token.is_empty() {
        return Err(format!("token file {} is empty", path.display()));
    }
    Ok(token)
}

/// The address from the first config file that exists: `explicit` if given
/// (it must exist), else the default paths. Returns the address and its file.
pub fn address_from_files(
    explicit: Option<&Path>,
    defaults: &[PathBuf],
) -> Result<Option<(String, String)>, ConfigError> {
    let path = match explicit {
        Some(p) => Some(p.to_path_buf()),
        None => defaults.iter().find(|p| p.is_file()).cloned(),
    };
    let Some(path) = path else { return Ok(None) };
    let config = load_config(&path)?;
    Ok(config
        .addr
        .map(|addr| (addr, format!("config file {}", path.display()))))
}

/// Applies the precedence: flag, environment, config (only consulted when
/// needed), default. The result is normalized to a URL.
pub fn resolve_addr(
    flag: Option<&str>,
    env: Option<&str>,
    config: impl FnOnce() -> Result<Option<(String, String)>, ConfigError>,
) -> Result<String, ConfigError> {
    let nonempty = |s: Option<&str>| {
        s.map(str::trim)
            .filter(|s| !s.is_empty())
            .map(str::to_string)
    };
    let (addr, origin) = if let Some(a) = nonempty(flag) {
        (a, "--addr".to_string())
    } else if let Some(a) = nonempty(env) {
        (a, "MUSTER_ADDR".to_string())
    } else if let Some(found) = config()? {
        found
    } else {
        (DEFAULT_ADDR.to_string(), "the default".to_string())
    };
    // Several schedulers may be listed, separated by commas.
    let mut out = Vec::new();
    for part in addr.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        out.push(normalize_addr(part).map_err(|reason| ConfigError::BadAddr {
            addr: part.to_string(),
            origin: origin.clone(),
            reason,
        })?);
    }
    if out.is_empty() {
        return Err(ConfigError::BadAddr {
            addr,
            origin,
            reason: "no address given".to_string(),
        });
    }
    Ok(out.join(","))
}

/// `host:port` becomes `http://host:port`; `http://` and `https://` URLs pass
/// through without a trailing slash.
pub fn normalize_addr(addr: &str) -> Result<String, String> {
    // An agent's user socket: `unix:/run/muster/agent.sock` (or unix:///...).
    if let Some(path) = addr.strip_prefix("unix:") {
        let path = path.strip_prefix("//").unwrap_or(path);
        if !path.starts_with('/') {
            return Err("a unix: address needs an absolute path".to_string());
        }
        return Ok(format!("unix:{path}"));
    }
    let url = match addr.split_once("://") {
        Some(("http" | "https", rest)) if !rest.is_empty() => addr.to_string(),
        Some((scheme, _)) if scheme != "http" && scheme != "https" => {
            return Err(format!(
                "unsupported scheme {scheme:?} (use http://, https:// or unix:/PATH)"
            ))
        }
        Some(_) => return Err("missing host".to_string()),
        None => format!("http://{addr}"),
    };
    let url = url.trim_end_matches('/').to_string();
    let authority = url.split_once("://").map_or("", |(_, rest)| rest);
    if authority.is_empty() || authority.contains(char::is_whitespace) {
        return Err("expected host:port or http://host:port".to_string());
    }
    url.parse::<tonic::transport::Uri>()
        .map_err(|e| format!("not a valid URL: {e}"))?;
    Ok(url)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn no_config() -> Result<Option<(String, String)>, ConfigError> {
        Ok(None)
    }

    fn config_says(addr: &str) -> impl FnOnce() -> Result<Option<(String, String)>, ConfigError> {
        let found = (addr.to_string(), "config file x".to_string());
        move || Ok(Some(found))
    }

    #[test]
    fn flag_beats_env_beats_config_beats_default() {
        let r = resolve_addr(Some("a:1"), Some("b:2"), config_says("c:3"));
        assert_eq!(r, Ok("http://a:1".to_string()));
        let r = resolve_addr(None, Some("b:2"), config_says("c:3"));
        assert_eq!(r, Ok("http://b:2".to_string()));
        let r = resolve_addr(None, None, config_says("https://c:3/"));
        assert_eq!(r, Ok("https://c:3".to_string()));
        let r = resolve_addr(None, None, no_config);
        assert_eq!(r, Ok(DEFAULT_ADDR.to_string()));
    }

    #[test]
    fn empty_env_counts_as_unset() {
        let r = resolve_addr(None, Some(""), config_says("c:3"));
        assert_eq!(r, Ok("http://c:3".to_string()));
    }

    #[test]
    fn token_files_readable_by_others_are_refused() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("token");
        std::fs::write(&p, "mst_x\n").unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = read_token_file(&p).unwrap_err();
        assert!(e.contains("mode 0644") && e.contains("chmod 600"), "{e}");
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert_eq!(read_token_file(&p).unwrap(), "mst_x");
    }

    #[test]
    fn config_is_not_read_when_an_address_is_given() {
        let broken = || -> Result<Option<(String, String)>, ConfigError> {
            Err(ConfigError::Read {
                path: "x".into(),
                reason: "boom".into(),
            })
        };
        assert!(resolve_addr(Some("a:1"), None, broken).is_ok());
        assert!(resolve_addr(None, None, broken).is_err());
    }

    #[test]
    fn bad_addresses_name_their_origin() {
        let err = resolve_addr(Some("ftp://x:1"), None, no_config).unwrap_err();
        assert!(err.to_string().contains("--addr"), "{err}");
        assert!(err.to_string().contains("unsupported scheme"), "{err}");
        let err = resolve_addr(None, None, config_says("http://")).unwrap_err();
        assert!(err.to_string().contains("config file x"), "{err}");
    }

    #[test]
    fn normalize_accepts_host_port() {
        assert_eq!(
            normalize_addr("10.0.0.1:7470"),
            Ok("http://10.0.0.1:7470".into())
        );
        assert_eq!(normalize_addr("http://h:1/"), Ok("http://h:1".into()));
        assert!(normalize_addr("has space:1").is_err());
    }

    #[test]
    fn config_unknown_keys_name_key_and_file() {
        let err = parse_config("/etc/muster/cli.toml", "adr = \"x\"\n").unwrap_err();
        let text = err.to_string();
        assert!(text.contains("/etc/muster/cli.toml"), "{text}");
        assert!(text.contains("adr"), "{text}");
        let ok = parse_config("f", "addr = \"h:1\"").expect("valid");
        assert_eq!(ok.addr.as_deref(), Some("h:1"));
    }

    #[test]
    fn default_paths_prefer_xdg() {
        let p = default_config_paths(Some("/x".into()), Some("/home/u".into()));
        assert_eq!(p[0], PathBuf::from("/x/muster/config.toml"));
        assert_eq!(p[1], PathBuf::from(SYSTEM_CONFIG));
        let p = default_config_paths(Some("".into()), Some("/home/u".into()));
        assert_eq!(p[0], PathBuf::from("/home/u/.config/muster/config.toml"));
        assert_eq!(
            default_config_paths(None, None),
            vec![PathBuf::from(SYSTEM_CONFIG)]
        );
    }

    #[test]
    fn explicit_config_must_exist_and_defaults_are_skipped() {
        let dir = tempfile::tempdir().expect("tempdir");
        let missing = dir.path().join("none.toml");
        assert!(address_from_files(Some(&missing), &[]).is_err());
        assert_eq!(
            address_from_files(None, std::slice::from_ref(&missing)),
            Ok(None)
        );
        let file = dir.path().join("cli.toml");
        std::fs::write(&file, "addr = \"h:9\"\n").expect("write");
        let found = address_from_files(None, &[missing, file.clone()]).expect("readable");
        assert_eq!(found.map(|f| f.0), Some("h:9".to_string()));
    }
}
