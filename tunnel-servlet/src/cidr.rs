//! IP address ranges in CIDR notation (`10.0.0.0/8`, `::1/128`, or a bare address meaning
//! one host), for the relay's list of trusted proxies. Small on purpose: parsing and a
//! membership test, nothing else.

use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

/// One IPv4 or IPv6 network: an address and a prefix length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    /// The network address, host bits cleared.
    network: IpAddr,
    prefix: u8,
}

/// Why a CIDR string was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CidrError {
    /// The part before `/` is not an IPv4 or IPv6 address.
    #[error("{0:?} is not an IP address")]
    Address(String),
    #[error("prefix length {0:?} is not a number from 0 to {1}")]
    /// The prefix length is not a number within the address family's bits (32 or 128).
    Prefix(String, u8),
    #[error("{0:?} has host bits set beyond the prefix (did you mean {1}?)")]
    /// Bits past the prefix are set (`10.1.2.3/8`); the range meant is given.
    HostBits(String, Cidr),
}

/// Bits of an address as one integer, IPv4 in the low 32 bits.
fn bits(addr: IpAddr) -> u128 {
    match addr {
        IpAddr::V4(v4) => u128::from(u32::from(v4)),
        IpAddr::V6(v6) => u128::from(v6),
    }
}

fn width(addr: IpAddr) -> u8 {
    if addr.is_ipv4() {
        32
    } else {
        128
    }
}

/// The mask of the top `prefix` bits of a `width`-bit address.
fn mask(prefix: u8, width: u8) -> u128 {
    if prefix == 0 {
        return 0;
    }
    let all = if width == 128 {
        u128::MAX
    } else {
        (1u128 << width) - 1
    };
    all & !((1u128 << (width - prefix)) - 1)
}

impl Cidr {
    /// The network of `prefix` bits around `addr`, or `None` if `prefix` is too long.
    pub fn new(addr: IpAddr, prefix: u8) -> Option<Cidr> {
        let width = width(addr);
        if prefix > width {
            return None;
        }
        let network = bits(addr) & mask(prefix, width);
        let network = match addr {
            IpAddr::V4(_) => IpAddr::V4((network as u32).into()),
            IpAddr::V6(_) => IpAddr::V6(network.into()),
        };
        Some(Cidr { network, prefix })
    }

    /// Whether `addr` lies in this network. An IPv4-mapped IPv6 address (`::ffff:a.b.c.d`,
    /// what a dual-stack socket reports for an IPv4 peer) is compared as the IPv4 address.
    pub fn contains(&self, addr: IpAddr) -> bool {
        let addr = match addr {
            IpAddr::V6(v6) => v6
                .to_ipv4_mapped()
                .map(IpAddr::V4)
                .unwrap_or(IpAddr::V6(v6)),
            v4 => v4,
        };
        if addr.is_ipv4() != self.network.is_ipv4() {
            return false;
        }
        bits(addr) & mask(self.prefix, width(addr)) == bits(self.network)
    }
}

impl FromStr for Cidr {
    type Err = CidrError;

    /// `ADDR/PREFIX` or a bare `ADDR` (a single host). Host bits set beyond the prefix are
    /// refused: `10.1.2.3/8` is more likely a typo than a wish to trust all of 10/8.
    fn from_str(s: &str) -> Result<Cidr, CidrError> {
        let s = s.trim();
        let (addr_text, prefix_text) = match s.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (s, None),
        };
        let addr: IpAddr = addr_text
            .parse()
            .map_err(|_| CidrError::Address(addr_text.to_string()))?;
        let width = width(addr);
        let prefix = match prefix_text {
            None => width,
            Some(p) => p
                .parse::<u8>()
                .ok()
                .filter(|n| *n <= width && p.bytes().all(|b| b.is_ascii_digit()))
                .ok_or_else(|| CidrError::Prefix(p.to_string(), width))?,
        };
        let cidr = Cidr::new(addr, prefix).expect("prefix checked against the width");
        if cidr.network != addr {
            return Err(CidrError::HostBits(s.to_string(), cidr));
        }
        Ok(cidr)
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.network, self.prefix)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn cidr(s: &str) -> Cidr {
        s.parse().unwrap()
    }

    #[test]
    fn ipv4_ranges() {
        let net = cidr("10.0.0.0/8");
        assert!(net.contains(ip("10.0.0.0")));
        assert!(net.contains(ip("10.255.255.255")));
        assert!(!net.contains(ip("11.0.0.0")));
        assert!(!net.contains(ip("9.255.255.255")));
        let host = cidr("127.0.0.1/32");
        assert!(host.contains(ip("127.0.0.1")));
        assert!(!host.contains(ip("127.0.0.2")));
        let odd = cidr("192.168.4.0/22");
        assert!(odd.contains(ip("192.168.7.255")));
        assert!(!odd.contains(ip("192.168.8.0")));
        assert!(!odd.contains(ip("192.168.3.255")));
    }

    #[test]
    fn ipv6_ranges() {
        let net = cidr("2001:db8::/32");
        assert!(net.contains(ip("2001:db8::1")));
        assert!(net.contains(ip("2001:db8:ffff:ffff:ffff:ffff:ffff:ffff")));
        assert!(!net.contains(ip("2001:db9::")));
        let host = cidr("::1/128");
        assert!(host.contains(ip("::1")));
        assert!(!host.contains(ip("::2")));
        let odd = cidr("fe80::/10");
        assert!(odd.contains(ip("febf::1")));
        assert!(!odd.contains(ip("fec0::1")));
    }

    #[test]
    fn zero_prefix_matches_its_whole_family_only() {
        assert!(cidr("0.0.0.0/0").contains(ip("203.0.113.7")));
        assert!(!cidr("0.0.0.0/0").contains(ip("2001:db8::1")));
        assert!(cidr("::/0").contains(ip("2001:db8::1")));
        assert!(!cidr("::/0").contains(ip("203.0.113.7")));
    }

    #[test]
    fn ipv4_mapped_ipv6_peers_match_ipv4_ranges() {
        assert!(cidr("127.0.0.0/8").contains(ip("::ffff:127.0.0.1")));
        assert!(!cidr("127.0.0.0/8").contains(ip("::ffff:10.0.0.1")));
    }

    #[test]
    fn a_bare_address_is_one_host() {
        assert_eq!(cidr("127.0.0.1"), cidr("127.0.0.1/32"));
        assert_eq!(cidr("::1"), cidr("::1/128"));
        assert_eq!(cidr(" 10.0.0.0/8 ").to_string(), "10.0.0.0/8");
        assert_eq!(cidr("2001:db8::/32").to_string(), "2001:db8::/32");
    }

    #[test]
    fn bad_input_is_refused_with_the_reason() {
        for bad in [
            "",
            "/8",
            "10.0.0/8",
            "example.com",
            "10.0.0.0/",
            "1.2.3.4.5",
        ] {
            assert!(
                matches!(
                    bad.parse::<Cidr>(),
                    Err(CidrError::Address(_) | CidrError::Prefix(..))
                ),
                "{bad:?}"
            );
        }
        for bad in [
            "10.0.0.0/33",
            "::/129",
            "10.0.0.0/-1",
            "10.0.0.0/+8",
            "10.0.0.0/8x",
        ] {
            assert!(
                matches!(bad.parse::<Cidr>(), Err(CidrError::Prefix(..))),
                "{bad:?}"
            );
        }
        let err = "10.1.2.3/8".parse::<Cidr>().unwrap_err();
        assert!(err.to_string().contains("did you mean 10.0.0.0/8"), "{err}");
        assert!("2001:db8::1/32".parse::<Cidr>().is_err());
    }
}
