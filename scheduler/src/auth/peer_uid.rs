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
pub fn uid_of(peer: SocketAddr, local: SocketAddr) -> Option<u32> {
    if !peer.ip().is_loopback() || !local.ip().is_loopback() {
        return None;
    }
    ["/proc/net/tcp", "/proc/net/tcp6"].iter().find_map(|f| {
        let text = std::fs::read_to_string(f).ok()?;
        find_uid(&text, peer, local)
    })
}

/// The uid column of the row whose local address is `peer` and remote address `local`.
pub fn find_uid(table: &str, peer: SocketAddr, local: SocketAddr) -> Option<u32> {
    table.lines().skip(1).find_map(|line| {
        let cols: Vec<&str> = line.split_whitespace().collect();
        let (l, r, uid) = (cols.get(1)?, cols.get(2)?, cols.get(7)?);
        (parse_addr(l)? == peer && parse_addr(r)? == local)
            .then(|| uid.parse().ok())
            .flatten()
    })
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
        assert_eq!(find_uid(TABLE, client, server), Some(1000));
        // Our own row (the other direction) is not the caller's.
        assert_eq!(find_uid(TABLE, server, client), Some(0));
        let other: SocketAddr = "127.0.0.1:1".parse().unwrap();
        assert_eq!(find_uid(TABLE, other, server), None);
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
    fn a_real_loopback_connection_is_ours() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let c = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (s, peer) = l.accept().unwrap();
        let uid = uid_of(peer, s.local_addr().unwrap());
        assert_eq!(uid, Some(nix::unistd::Uid::effective().as_raw()));
        drop(c);
    }
}
