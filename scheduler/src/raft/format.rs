//! Versioned encodings of what Raft keeps and sends: a command in a log
//! entry, and the state in a snapshot.
//!
//! Both are bincode underneath ([`Command::encode`], [`State::to_snapshot`]),
//! which has no room for a version: a scheduler reading data written by a
//! newer one would fail on a variant it does not know, or worse, read it as
//! something else. So each gets a header, a magic and a format version. A
//! reader refuses a newer version by name ("written by a newer scheduler")
//! rather than guessing, and the driver stops on anything it cannot decode:
//! skipping an entry some replicas can apply would make them diverge.
//!
//! Data written before the header existed (plain bincode) is told apart
//! from headed data: the magics cannot begin plain bincode of either type
//! (a command begins with its variant as a little-endian `u32`, far below
//! `0x01..`; the state with its job count as a `u64`, and the snapshot
//! magic read so is past 10^16). It decodes with today's types, so it reads
//! only where those types did not change since: node registrations and
//! states holding nodes from before 2026-12-05 (which gained `log_key`)
//! fail to decode, and the member stops naming the index (README: such an
//! upgrade is not rolling).
//!
//! Bump [`COMMAND_VERSION`] whenever [`Command`]'s encoding changes (a new
//! variant or field), and [`SNAPSHOT_VERSION`] whenever [`State`]'s does.

use crate::state::{Command, State};

/// Format of the commands this scheduler writes; it reads this and older.
pub const COMMAND_VERSION: u8 = 1;
/// Format of the snapshots this scheduler writes; it reads this and older.
pub const SNAPSHOT_VERSION: u8 = 1;

const COMMAND_MAGIC: [u8; 3] = [0xFF, b'M', b'C'];
const SNAPSHOT_MAGIC: [u8; 7] = [0xFF, b'M', b'S', b'N', b'A', b'P', b'V'];

/// Why stored or received bytes could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FormatError {
    #[error(
        "written in format version {found} by a newer scheduler; this one reads up to \
         version {supported}: upgrade this scheduler"
    )]
    Newer { found: u8, supported: u8 },
    #[error("format version {version} does not decode: {message}")]
    Undecodable { version: u8, message: String },
}

/// Add the command header to `bincode` (a [`Command::encode`]d command).
/// Bytes that already carry a header are returned as they are.
pub fn wrap_command(bincode: Vec<u8>) -> Vec<u8> {
    if bincode.starts_with(&COMMAND_MAGIC) {
        return bincode;
    }
    let mut out = Vec::with_capacity(bincode.len() + 4);
    out.extend_from_slice(&COMMAND_MAGIC);
    out.push(COMMAND_VERSION);
    out.extend_from_slice(&bincode);
    out
}

/// Encode a command for the log (and for forwarding to the leader).
pub fn encode_command(cmd: &Command) -> Vec<u8> {
    wrap_command(cmd.encode())
}

/// Decode a command written by [`encode_command`] (or plain bincode, as
/// written before the header).
pub fn decode_command(data: &[u8]) -> Result<Command, FormatError> {
    let (version, body) = split(data, &COMMAND_MAGIC, COMMAND_VERSION)?;
    Command::decode(body).map_err(|e| FormatError::Undecodable {
        version,
        message: e.to_string(),
    })
}

/// Encode the state for a snapshot.
pub fn encode_snapshot(state: &State) -> Vec<u8> {
    let body = state.to_snapshot();
    let mut out = Vec::with_capacity(body.len() + SNAPSHOT_MAGIC.len() + 1);
    out.extend_from_slice(&SNAPSHOT_MAGIC);
    out.push(SNAPSHOT_VERSION);
    out.extend_from_slice(&body);
    out
}

/// Decode a snapshot written by [`encode_snapshot`] (or plain bincode, as
/// written before the header; empty: a fresh state).
pub fn decode_snapshot(data: &[u8]) -> Result<State, FormatError> {
    let (version, body) = split(data, &SNAPSHOT_MAGIC, SNAPSHOT_VERSION)?;
    State::from_snapshot(body).map_err(|e| FormatError::Undecodable {
        version,
        message: e.to_string(),
    })
}

/// The format version and the body; version 0 is plain bincode.
fn split<'a>(data: &'a [u8], magic: &[u8], supported: u8) -> Result<(u8, &'a [u8]), FormatError> {
    let Some(rest) = data.strip_prefix(magic) else {
        return Ok((0, data));
    };
    match rest.split_first() {
        Some((&found, _)) if found > supported => Err(FormatError::Newer { found, supported }),
        Some((&version, body)) => Ok((version, body)),
        None => Err(FormatError::Undecodable {
            version: 0,
            message: "the header ends before its version".into(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cmd() -> Command {
        Command::Cancel {
            job: crate::model::JobId(7),
            at_ms: 1,
        }
    }

    #[test]
    fn commands_and_snapshots_round_trip_with_and_without_a_header() {
        let c = cmd();
        assert_eq!(decode_command(&encode_command(&c)).unwrap(), c);
        assert_eq!(decode_command(&c.encode()).unwrap(), c, "plain bincode");
        assert_eq!(wrap_command(encode_command(&c)), encode_command(&c));
        let s = State::new();
        assert_eq!(
            decode_snapshot(&encode_snapshot(&s)).unwrap().digest(),
            s.digest()
        );
        assert_eq!(
            decode_snapshot(&s.to_snapshot()).unwrap().digest(),
            s.digest()
        );
        assert_eq!(decode_snapshot(&[]).unwrap().digest(), s.digest());
    }

    #[test]
    fn a_newer_format_is_refused_by_name() {
        let mut c = encode_command(&cmd());
        c[3] = COMMAND_VERSION + 1;
        let e = decode_command(&c).unwrap_err();
        assert_eq!(
            e,
            FormatError::Newer {
                found: COMMAND_VERSION + 1,
                supported: COMMAND_VERSION
            }
        );
        assert!(e.to_string().contains("newer scheduler"), "{e}");
        let mut s = encode_snapshot(&State::new());
        s[SNAPSHOT_MAGIC.len()] = SNAPSHOT_VERSION + 1;
        assert!(matches!(
            decode_snapshot(&s),
            Err(FormatError::Newer { .. })
        ));
    }

    #[test]
    fn garbage_is_an_error_naming_the_version() {
        let mut c = encode_command(&cmd());
        c.truncate(5);
        assert!(matches!(
            decode_command(&c),
            Err(FormatError::Undecodable { version: 1, .. })
        ));
        assert!(decode_command(&[9, 9, 9]).is_err());
    }
}
