//! Who is on the other end of a loopback connection: the uid that owns the
//! caller's socket, read from `/proc/net/tcp{,6}`.
//!
//! Both ends of a loopback TCP connection are sockets of this host, so the
//! kernel lists the caller's socket (local address = the peer address we
//! see, remote address = our own) with its owner's uid. This is the TCP
//! equivalent of `SO_PEERCRED`; it lets root on a scheduler's host
//! administer the cluster (and `muster dev` work) without a token.

use std::net::{IpAddr, SocketAddr};

/// The uid owning the socket at `peer` connected to our `local`, if both are
/// loopback addresses of this host.
///
/// The table holds every TCP socket of the host (thousands on a busy one,
/// many in TIME_WAIT), so it is searched for the caller's row as text, the
/// way the kernel writes its addresses, and only that row is parsed.
pub fn uid_of(peer: SocketAddr, local: SocketAddr) -> Option<u32> {
    if !peer.ip().is_loopback() || !local.ip().is_loopback() {
        return None;
    }
    [("/proc/net/tcp", false), ("/proc/net/tcp6", true)]
        .iter()
        .find_map(|(f, v6)| find_uid(&std::fs::read_to_string(f).ok()?, *v6, peer, local))
}

/// An address as `/proc/net/tcp` (`v6` false) or `tcp6` writes it: each
/// 32-bit word of the address in host order as 8 hex digits, a colon, the
/// port as 4. An IPv4 address appears in `tcp6` mapped (`::ffff:a.b.c.d`);
/// an IPv6 one never appears in `tcp`.
fn kernel_hex(addr: SocketAddr, v6: bool) -> Option<String> {
    let octets: Vec<u8> = match (addr.ip(), v6) {
        (IpAddr::V4(ip), false) => ip.octets().to_vec(),
        (IpAddr::V4(ip), true) => ip.to_ipv6_mapped().octets().to_vec(),
        (IpAddr::V6(ip), true) => ip.octets().to_vec(),
        (IpAddr::V6(_), false) => return None,
    };
    let mut out = String::with_capacity(octets.len() * 2 + 5);
    for w in octets.chunks(4) {
        let word = u32::from_ne_bytes([w[0], w[1], w[2], w[3]]);
        out.push_str(&format!("{word:08X}"));
    }
    out.push_str(&format!(":{:04X}", addr.port()));
    Some(out)
}

/// The kernel's code for `TCP_ESTABLISHED` in the `st` column.
const ESTABLISHED: &str = "01";

/// In a `tcp` (`v6` false) or `tcp6` table: the uid column of the
/// established row whose local address is `peer` and remote address `local`.
///
/// Only an established row is the caller's live socket: the same address
/// pair can also appear in rows of closed connections (TIME_WAIT and the
/// like, which the kernel lists with uid 0), and believing one of those would
/// make any caller root.
pub fn find_uid(table: &str, v6: bool, peer: SocketAddr, local: SocketAddr) -> Option<u32> {
    let pair = format!("{} {}", kernel_hex(peer, v6)?, kernel_hex(local, v6)?);
    table.match_indices(&pair).find_map(|(at, _)| {
        let start = table[..at].rfind('\n').map_or(0, |i| i + 1);
        let end = table[at..].find('\n').map_or(table.len(), |i| at + i);
        uid_in_row(&table[start..end], peer, local)
    })
}

/// The uid of one row, if it is the row of `peer`'s socket connected to
/// `local` and the connection is established.
fn uid_in_row(line: &str, peer: SocketAddr, local: SocketAddr) -> Option<u32> {
    let mut cols = line.split_whitespace();
    let (l, r, st) = (cols.nth(1)?, cols.next()?, cols.next()?);
    let uid = cols.nth(3)?;
    (st == ESTABLISHED && parse_addr(l)? == peer && parse_addr(r)? == local)
        .then(|| uid.parse().ok())
        .flatten()
}

/// `0100007F:1F90` (IPv4) or 32 hex digits and a port (IPv6), as the kernel
/// writes them: each 32-bit word in host (little-endian) order.
fn parse_addr(s: &str) -> Option<SocketAddr> {
    let (ip, port) = s.split_once(':')?;
    let port = u16::from_str_radix(port, 16).ok()?;
    let words: Vec<u32> = (0..ip.len() / 8)
        .map(|i| {
            ip.get(i * 8..i * 8 + 8)
                .and_then(|w| u32::from_str_radix(w, 16).ok())
        })
        .collect::<Option<_>>()?;
    let ip = match words.as_slice() {
        [w] => IpAddr::from(w.swap_bytes().to_be_bytes()),
        [a, b, c, d] => {
            let mut bytes = [0u8; 16];
            for (i, w) in [a, b, c, d].iter().enumerate() {
                bytes[i * 4..i * 4 + 4].copy_from_slice(&w.swap_bytes().to_be_bytes());
            }
            let v6 = std::net::Ipv6Addr::from(bytes);
            v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4)
        }
        _ => return None,
    };
    Some(SocketAddr::new(ip, port))
}

#[cfg(test)]
mod tests {
    use super::*;

    const TABLE: &str = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 0100007F:1D2E 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1 1 0 100 0 0 10 0
   1: 0100007F:D431 0100007F:1D2E 01 00000000:00000000 00:00000000 00000000  1000        0 2 1 0 20 4 30 10 -1
   2: 0100007F:1D2E 0100007F:D431 01 00000000:00000000 00:00000000 00000000     0        0 3 1 0 20 4 30 10 -1
";

    #[test]
    fn the_callers_row_gives_its_uid() {
        let server: SocketAddr = "127.0.0.1:7470".parse().unwrap();
        let client: SocketAddr = "127.0.0.1:54321".parse().unwrap();
        assert_eq!(find_uid(TABLE, false, client, server), Some(1000));
        // Our own row (the other direction) is not the caller's.
        assert_eq!(find_uid(TABLE, false, server, client), Some(0));
        let other: SocketAddr = "127.0.0.1:1".parse().unwrap();
        assert_eq!(find_uid(TABLE, false, other, server), None);
    }

    #[test]
    fn only_an_established_row_counts() {
        let server: SocketAddr = "127.0.0.1:7470".parse().unwrap();
        let client: SocketAddr = "127.0.0.1:54321".parse().unwrap();
        // A closed connection with the same addresses (TIME_WAIT, listed
        // with uid 0) before the live one: the live one's owner answers.
        let table = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 0100007F:D431 0100007F:1D2E 06 00000000:00000000 03:00000123 00000000     0        0 0 3 0
   1: 0100007F:D431 0100007F:1D2E 01 00000000:00000000 00:00000000 00000000  1000        0 2 1 0 20 4 30 10 -1
";
        assert_eq!(find_uid(table, false, client, server), Some(1000));
        // Only closed rows (TIME_WAIT, FIN_WAIT2, CLOSE_WAIT): nobody.
        for st in ["06", "05", "08", "07"] {
            let row = format!(
                "   0: 0100007F:D431 0100007F:1D2E {st} 00000000:00000000 03:00000123 00000000     0        0 0 3 0\n"
            );
            assert_eq!(find_uid(&row, false, client, server), None, "state {st}");
        }
    }

    #[test]
    fn ipv6_and_mapped_addresses_parse() {
        let lo6 = parse_addr("00000000000000000000000001000000:1D2E").unwrap();
        assert_eq!(lo6, "[::1]:7470".parse().unwrap());
        let mapped = parse_addr("0000000000000000FFFF00000100007F:1D2E").unwrap();
        assert_eq!(mapped, "127.0.0.1:7470".parse().unwrap());
        assert_eq!(parse_addr("zz:1"), None);
    }

    #[test]
    fn addresses_are_written_as_the_kernel_writes_them() {
        let v4: SocketAddr = "127.0.0.1:7470".parse().unwrap();
        assert_eq!(kernel_hex(v4, false).unwrap(), "0100007F:1D2E");
        assert_eq!(
            kernel_hex(v4, true).unwrap(),
            "0000000000000000FFFF00000100007F:1D2E"
        );
        let v6: SocketAddr = "[::1]:7470".parse().unwrap();
        assert_eq!(kernel_hex(v6, false), None);
        for a in [v4, v6] {
            let is6 = a.is_ipv6();
            assert_eq!(parse_addr(&kernel_hex(a, is6).unwrap()), Some(a));
        }
        let row = "   1: 0100007F:D431 0100007F:1D2E 01 00000000:00000000 00:00000000 00000000  1000        0 2";
        let client: SocketAddr = "127.0.0.1:54321".parse().unwrap();
        assert_eq!(uid_in_row(row, client, v4), Some(1000));
        assert_eq!(uid_in_row(row, v4, client), None);
    }

    #[test]
    fn a_real_loopback_connection_is_ours() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let c = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (s, peer) = l.accept().unwrap();
        let uid = uid_of(peer, s.local_addr().unwrap());
        assert_eq!(uid, Some(nix::unistd::Uid::effective().as_raw()));
        drop(c);
    }
}
