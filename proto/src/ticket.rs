//! Log tickets: how an agent knows that a scheduler allowed a read of a
//! task's output.
//!
//! Logs live on the agents, and anyone who can reach an agent's port could
//! ask for them, so an agent serves a read only against a ticket. Each agent
//! run draws a fresh random key and sends it in its registration, which the
//! scheduler replicates (every member can then issue tickets, and the key is
//! never shown by any API). A scheduler that has checked the caller may see
//! the job in full signs a ticket naming the job, the task, the node and an
//! expiry with HMAC-SHA256 under that key; the agent checks the signature,
//! that the ticket is for this node and this task, and that it has not
//! expired. A restarted agent has a new key, so older tickets die with it.

use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::LogTicket;

/// Length of an agent's ticket key in bytes.
pub const KEY_LEN: usize = 32;

/// How long a ticket is valid after it is issued. A read (or a `--follow`)
/// only has to start within it.
pub const TTL_MS: i64 = 60_000;

/// Tolerated clock difference between scheduler and agent hosts.
pub const SKEW_MS: i64 = 30_000;

const DOMAIN: &[u8] = b"muster-log-ticket-v1\0";

/// Why an agent refused a ticket.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TicketError {
    #[error("no log ticket: ask the scheduler for access (muster logs does this)")]
    Missing,
    #[error("the log ticket is for node {ticket:?}, not this node ({node:?})")]
    WrongNode { ticket: String, node: String },
    #[error(
        "the log ticket is for job {ticket_job} task {ticket_task}, not job {job} task {task}"
    )]
    WrongTask {
        ticket_job: u64,
        ticket_task: u32,
        job: u64,
        task: u32,
    },
    #[error("the log ticket expired (or the clocks of scheduler and agent differ by more than {}s)", SKEW_MS / 1000)]
    Expired,
    #[error("the log ticket's signature does not match this agent's key (the agent may have restarted since it was issued)")]
    BadSignature,
    #[error("this agent has no usable ticket key")]
    BadKey,
}

/// A fresh random key for one agent run.
pub fn new_key() -> std::io::Result<Vec<u8>> {
    use std::io::Read;
    let mut key = vec![0u8; KEY_LEN];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut key)?;
    Ok(key)
}

fn mac_of(key: &[u8], t: &LogTicket) -> Result<Hmac<Sha256>, TicketError> {
    if key.len() != KEY_LEN {
        return Err(TicketError::BadKey);
    }
    let mut mac = Hmac::<Sha256>::new_from_slice(key).map_err(|_| TicketError::BadKey)?;
    mac.update(DOMAIN);
    mac.update(&t.job_id.to_be_bytes());
    mac.update(&t.task_index.to_be_bytes());
    mac.update(&(t.node.len() as u64).to_be_bytes());
    mac.update(t.node.as_bytes());
    mac.update(&t.expires_ms.to_be_bytes());
    mac.update(&(t.principal.len() as u64).to_be_bytes());
    mac.update(t.principal.as_bytes());
    Ok(mac)
}

/// A signed ticket for `principal` to read `job`'s task `task` on `node`,
/// valid until `now_ms + TTL_MS`.
pub fn issue(
    key: &[u8],
    node: &str,
    job: u64,
    task: u32,
    principal: &str,
    now_ms: i64,
) -> Result<LogTicket, TicketError> {
    let mut t = LogTicket {
        job_id: job,
        task_index: task,
        node: node.to_string(),
        expires_ms: now_ms.saturating_add(TTL_MS),
        principal: principal.to_string(),
        mac: Vec::new(),
    };
    t.mac = mac_of(key, &t)?.finalize().into_bytes().to_vec();
    Ok(t)
}

/// Checks `ticket` on the agent of `node` for a read of `job`'s task `task`.
pub fn verify(
    key: &[u8],
    ticket: Option<&LogTicket>,
    node: &str,
    job: u64,
    task: u32,
    now_ms: i64,
) -> Result<(), TicketError> {
    let t = ticket.ok_or(TicketError::Missing)?;
    // The signature first: nothing else in an unsigned ticket is worth a
    // specific answer.
    mac_of(key, t)?
        .verify_slice(&t.mac)
        .map_err(|_| TicketError::BadSignature)?;
    if t.node != node {
        return Err(TicketError::WrongNode {
            ticket: t.node.clone(),
            node: node.to_string(),
        });
    }
    if t.job_id != job || t.task_index != task {
        return Err(TicketError::WrongTask {
            ticket_job: t.job_id,
            ticket_task: t.task_index,
            job,
            task,
        });
    }
    // Expired, or issued implausibly far in the future (a forged clock).
    if now_ms > t.expires_ms.saturating_add(SKEW_MS)
        || t.expires_ms > now_ms.saturating_add(TTL_MS + SKEW_MS)
    {
        return Err(TicketError::Expired);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: i64 = 1_800_000_000_000;

    fn key() -> Vec<u8> {
        new_key().expect("urandom")
    }

    #[test]
    fn a_ticket_opens_its_own_task_only() {
        let k = key();
        let t = issue(&k, "gpu01", 7, 1, "alice", NOW).expect("issue");
        assert_eq!(verify(&k, Some(&t), "gpu01", 7, 1, NOW + 1000), Ok(()));
        assert!(matches!(
            verify(&k, Some(&t), "gpu01", 7, 0, NOW),
            Err(TicketError::WrongTask { .. })
        ));
        assert!(matches!(
            verify(&k, Some(&t), "gpu01", 8, 1, NOW),
            Err(TicketError::WrongTask { .. })
        ));
        assert!(matches!(
            verify(&k, Some(&t), "gpu02", 7, 1, NOW),
            Err(TicketError::WrongNode { .. })
        ));
    }

    #[test]
    fn no_ticket_or_another_key_is_refused() {
        let k = key();
        assert_eq!(
            verify(&k, None, "gpu01", 7, 1, NOW),
            Err(TicketError::Missing)
        );
        let t = issue(&key(), "gpu01", 7, 1, "alice", NOW).expect("issue");
        assert_eq!(
            verify(&k, Some(&t), "gpu01", 7, 1, NOW),
            Err(TicketError::BadSignature)
        );
    }

    #[test]
    fn any_changed_field_breaks_the_signature() {
        let k = key();
        let t = issue(&k, "gpu01", 7, 1, "alice", NOW).expect("issue");
        let changes: [fn(&mut LogTicket); 5] = [
            |t| t.job_id = 8,
            |t| t.task_index = 2,
            |t| t.node = "gpu02".into(),
            |t| t.expires_ms += 1,
            |t| t.principal = "root".into(),
        ];
        for change in changes {
            let mut forged = t.clone();
            change(&mut forged);
            assert_eq!(
                verify(
                    &k,
                    Some(&forged),
                    &forged.node,
                    forged.job_id,
                    forged.task_index,
                    NOW
                ),
                Err(TicketError::BadSignature)
            );
        }
        let mut empty = t.clone();
        empty.mac.clear();
        assert_eq!(
            verify(&k, Some(&empty), "gpu01", 7, 1, NOW),
            Err(TicketError::BadSignature)
        );
    }

    #[test]
    fn tickets_expire() {
        let k = key();
        let t = issue(&k, "gpu01", 7, 1, "alice", NOW).expect("issue");
        let late = NOW + TTL_MS + SKEW_MS + 1;
        assert_eq!(
            verify(&k, Some(&t), "gpu01", 7, 1, late),
            Err(TicketError::Expired)
        );
        // A ticket from a scheduler whose clock runs far ahead is refused too.
        let early = NOW - 2 * (TTL_MS + SKEW_MS);
        assert_eq!(
            verify(&k, Some(&t), "gpu01", 7, 1, early),
            Err(TicketError::Expired)
        );
    }

    #[test]
    fn a_short_key_is_refused() {
        assert_eq!(
            issue(&[1, 2, 3], "gpu01", 7, 1, "alice", NOW).map(|_| ()),
            Err(TicketError::BadKey)
        );
    }
}
