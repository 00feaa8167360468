//! Egress policy: which names a guest may resolve and which addresses and ports it may reach.
//!
//! Some addresses are never reachable whatever a policy says: loopback, link-local
//! (cloud metadata lives there), the host's own addresses, and unspecified, multicast and
//! broadcast ones. Private ranges are reachable only when an allow entry names them.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::str::FromStr;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

/// What a VM may reach beyond itself.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "camelCase")]
pub enum Egress {
    /// Nothing.
    None,
    /// The public internet (any public address, any port, any name), plus `extra`.
    Internet {
        /// Operator-wide allowances (e.g. an internal package mirror).
        extra: Vec<Allow>,
    },
    /// Only what the entries name.
    Only {
        /// The connector's entries and the operator-wide ones.
        allow: Vec<Allow>,
    },
}

/// One allowance: a domain pattern or a network, with ports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Allow {
    /// What it names.
    pub target: Target,
    /// Which destination ports (empty: every port).
    pub ports: Vec<(u16, u16)>,
}

/// A domain pattern (`example.com`, `*.example.com`) or a network.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// A name; `*.` at the front matches every name below it (not the name itself).
    Domain(String),
    /// Addresses in this network.
    Net(IpNet),
}

/// Why an allow entry could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("allow entry {entry:?}: {why} (expected NAME[:PORTS], *.NAME[:PORTS], CIDR[:PORTS] or [IPv6-CIDR]:PORTS; PORTS like 443 or 80,443 or 8000-8100)")]
pub struct AllowParseError {
    entry: String,
    why: String,
}

impl FromStr for Allow {
    type Err = AllowParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let fail = |why: &str| AllowParseError {
            entry: s.to_string(),
            why: why.to_string(),
        };
        let s_trim = s.trim();
        if s_trim.is_empty() {
            return Err(fail("it is empty"));
        }
        let (host, ports) = if let Some(rest) = s_trim.strip_prefix('[') {
            let (inner, after) = rest.split_once(']').ok_or_else(|| fail("no closing ]"))?;
            let ports = match after.strip_prefix(':') {
                Some(p) => Some(p),
                None if after.is_empty() => None,
                None => return Err(fail("text after ]")),
            };
            (inner, ports)
        } else if s_trim.matches(':').count() > 1 {
            // A bare IPv6 network without ports.
            (s_trim, None)
        } else {
            match s_trim.split_once(':') {
                Some((h, p)) => (h, Some(p)),
                None => (s_trim, None),
            }
        };
        let ports = match ports {
            Some(p) => parse_ports(p).map_err(|why| fail(&why))?,
            None => Vec::new(),
        };
        let target = if let Ok(net) = host.parse::<IpNet>() {
            Target::Net(net.trunc())
        } else if let Ok(ip) = host.parse::<IpAddr>() {
            Target::Net(IpNet::from(ip))
        } else {
            Target::Domain(parse_domain(host).map_err(|why| fail(&why))?)
        };
        Ok(Allow { target, ports })
    }
}

fn parse_ports(text: &str) -> Result<Vec<(u16, u16)>, String> {
    let mut out = Vec::new();
    for part in text.split(',') {
        let part = part.trim();
        let (lo, hi) = match part.split_once('-') {
            Some((a, b)) => (a, b),
            None => (part, part),
        };
        let lo: u16 = lo.parse().map_err(|_| format!("bad port {part:?}"))?;
        let hi: u16 = hi.parse().map_err(|_| format!("bad port {part:?}"))?;
        if lo == 0 || hi < lo {
            return Err(format!("bad port range {part:?}"));
        }
        out.push((lo, hi));
    }
    Ok(out)
}

fn parse_domain(host: &str) -> Result<String, String> {
    let name = normalize(host);
    let body = name.strip_prefix("*.").unwrap_or(&name);
    if body.is_empty() || body.len() > 253 {
        return Err("not a domain name".into());
    }
    for label in body.split('.') {
        let ok = !label.is_empty()
            && label.len() <= 63
            && label
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
        if !ok {
            return Err(format!("{label:?} is not a domain label"));
        }
    }
    Ok(name)
}

/// A name as compared: lower case, without a trailing dot.
pub fn normalize(name: &str) -> String {
    name.trim().trim_end_matches('.').to_ascii_lowercase()
}

impl fmt::Display for Allow {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.target {
            Target::Domain(d) => write!(f, "{d}")?,
            Target::Net(n) if self.ports.is_empty() => write!(f, "{n}")?,
            Target::Net(IpNet::V6(n)) => write!(f, "[{n}]")?,
            Target::Net(n) => write!(f, "{n}")?,
        }
        if !self.ports.is_empty() {
            let ports: Vec<String> = self
                .ports
                .iter()
                .map(|(a, b)| {
                    if a == b {
                        a.to_string()
                    } else {
                        format!("{a}-{b}")
                    }
                })
                .collect();
            write!(f, ":{}", ports.join(","))?;
        }
        Ok(())
    }
}

impl Serialize for Allow {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

impl<'de> Deserialize<'de> for Allow {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

impl Allow {
    fn port_ok(&self, port: u16) -> bool {
        self.ports.is_empty() || self.ports.iter().any(|(a, b)| (*a..=*b).contains(&port))
    }

    /// Whether this entry's domain pattern covers `name` (normalized).
    pub fn matches_name(&self, name: &str) -> bool {
        match &self.target {
            Target::Domain(pattern) => match pattern.strip_prefix("*.") {
                Some(parent) => {
                    name.len() > parent.len() + 1 && name.ends_with(&format!(".{parent}"))
                }
                None => name == pattern,
            },
            Target::Net(_) => false,
        }
    }

    fn matches_addr(&self, ip: IpAddr, port: u16) -> bool {
        match &self.target {
            Target::Net(net) => net.contains(&ip) && self.port_ok(port),
            Target::Domain(_) => false,
        }
    }
}

/// What an address is, as far as egress cares.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum AddressClass {
    /// 127/8, ::1.
    Loopback,
    /// 169.254/16, fe80::/10 (cloud metadata).
    LinkLocal,
    /// One of the host's own interface addresses.
    Host,
    /// Unspecified, multicast, broadcast, 0/8, 240/4 and other addresses no guest needs.
    Reserved,
    /// 10/8, 172.16/12, 192.168/16, 100.64/10, fc00::/7.
    Private,
    /// Everything else.
    Public,
}

impl AddressClass {
    /// Of an address, given the host's own addresses.
    pub fn of(ip: IpAddr, host: &[IpAddr]) -> AddressClass {
        let ip = match ip {
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => IpAddr::V4(v4),
                None => IpAddr::V6(v6),
            },
            v4 => v4,
        };
        if ip.is_loopback() {
            return AddressClass::Loopback;
        }
        if host.contains(&ip) {
            return AddressClass::Host;
        }
        match ip {
            IpAddr::V4(v4) => class_v4(v4),
            IpAddr::V6(v6) => class_v6(v6),
        }
    }

    /// Loopback, link-local, host and reserved addresses are never reachable.
    pub fn never(self) -> bool {
        matches!(
            self,
            AddressClass::Loopback
                | AddressClass::LinkLocal
                | AddressClass::Host
                | AddressClass::Reserved
        )
    }
}

fn class_v4(ip: Ipv4Addr) -> AddressClass {
    let o = ip.octets();
    if ip.is_link_local() {
        AddressClass::LinkLocal
    } else if ip.is_unspecified()
        || ip.is_multicast()
        || ip.is_broadcast()
        || o[0] == 0
        || o[0] >= 240
    {
        AddressClass::Reserved
    } else if ip.is_private() || (o[0] == 100 && (64..128).contains(&o[1])) {
        AddressClass::Private
    } else {
        AddressClass::Public
    }
}

fn class_v6(ip: Ipv6Addr) -> AddressClass {
    let s = ip.segments();
    if (s[0] & 0xffc0) == 0xfe80 {
        AddressClass::LinkLocal
    } else if ip.is_unspecified() || ip.is_multicast() {
        AddressClass::Reserved
    } else if (s[0] & 0xfe00) == 0xfc00 {
        AddressClass::Private
    } else {
        AddressClass::Public
    }
}

/// The answer for one connection attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Admission {
    /// Connect; no name to check.
    Open,
    /// Connect, but a TLS SNI or HTTP Host the client sends must be one of these names
    /// (the allowed names this VM resolved to the address).
    Named(Vec<String>),
    /// Refuse, for this reason.
    Deny(String),
}

impl Egress {
    fn entries(&self) -> &[Allow] {
        match self {
            Egress::None => &[],
            Egress::Internet { extra } => extra,
            Egress::Only { allow } => allow,
        }
    }

    /// Whether the resolver may answer `name` at all.
    pub fn may_resolve(&self, name: &str) -> bool {
        match self {
            Egress::None => false,
            Egress::Internet { .. } => true,
            Egress::Only { allow } => allow.iter().any(|a| a.matches_name(name)),
        }
    }

    /// Whether an address the resolver found for `name` may be handed to the guest.
    pub fn may_answer(&self, name: &str, ip: IpAddr, host: &[IpAddr]) -> bool {
        let class = AddressClass::of(ip, host);
        if class.never() {
            return false;
        }
        let named = self.entries().iter().any(|a| a.matches_name(name));
        let in_net = self.entries().iter().any(|a| match &a.target {
            Target::Net(n) => n.contains(&ip),
            Target::Domain(_) => false,
        });
        match self {
            Egress::None => false,
            Egress::Internet { .. } => class == AddressClass::Public || named || in_net,
            Egress::Only { .. } => named,
        }
    }

    /// Decides a connection to `ip:port`; `names` are the names this VM resolved to `ip`.
    pub fn admit(&self, ip: IpAddr, port: u16, names: &[String], host: &[IpAddr]) -> Admission {
        let class = AddressClass::of(ip, host);
        if class.never() {
            return Admission::Deny(format!("{ip} is {}", label(class)));
        }
        if let Egress::None = self {
            return Admission::Deny("this VM has no egress connector".into());
        }
        if self.entries().iter().any(|a| a.matches_addr(ip, port)) {
            return Admission::Open;
        }
        let allowed: Vec<String> = names
            .iter()
            .filter(|n| {
                self.entries()
                    .iter()
                    .any(|a| a.matches_name(n) && a.port_ok(port))
            })
            .cloned()
            .collect();
        if !allowed.is_empty() {
            return Admission::Named(allowed);
        }
        match (self, class) {
            (Egress::Internet { .. }, AddressClass::Public) => Admission::Open,
            (Egress::Internet { .. }, _) => Admission::Deny(format!(
                "{ip} is a private address the operator has not allowed"
            )),
            _ => Admission::Deny(format!("{ip}:{port} is not on the connector's allow-list")),
        }
    }
}

fn label(class: AddressClass) -> &'static str {
    match class {
        AddressClass::Loopback => "a loopback address",
        AddressClass::LinkLocal => "a link-local address",
        AddressClass::Host => "one of the host's own addresses",
        AddressClass::Reserved => "a reserved address",
        AddressClass::Private => "a private address",
        AddressClass::Public => "a public address",
    }
}

/// The host's own interface addresses, now.
pub fn host_addresses() -> Vec<IpAddr> {
    let mut out = Vec::new();
    if let Ok(addrs) = nix::ifaddrs::getifaddrs() {
        for a in addrs {
            let Some(addr) = a.address else { continue };
            if let Some(v4) = addr.as_sockaddr_in() {
                out.push(IpAddr::V4(v4.ip()));
            } else if let Some(v6) = addr.as_sockaddr_in6() {
                out.push(IpAddr::V6(v6.ip()));
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn allow(list: &[&str]) -> Egress {
        Egress::Only {
            allow: list.iter().map(|s| s.parse().expect("entry")).collect(),
        }
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("ip")
    }

    #[test]
    fn parse_when_forms_vary_then_each_reads_back_as_written() {
        for text in [
            "*.pypi.org:443",
            "example.com",
            "203.0.113.0/24",
            "10.9.0.1/32:80,443",
            "[fd00::/8]:443",
            "host:8000-8100",
        ] {
            let a: Allow = text.parse().expect(text);
            assert_eq!(a.to_string(), text);
        }
    }

    #[test]
    fn parse_when_garbage_then_error_says_the_expected_forms() {
        let err = "exa mple:99999".parse::<Allow>().expect_err("bad");
        assert!(err.to_string().contains("expected NAME[:PORTS]"));
    }

    #[test]
    fn classify_when_special_ranges_then_never_reachable() {
        let host = [ip("192.0.2.2")];
        for a in [
            "127.0.0.1",
            "169.254.169.254",
            "192.0.2.2",
            "0.0.0.0",
            "224.0.0.1",
            "::1",
            "fe80::1",
            "::ffff:127.0.0.1",
            "255.255.255.255",
        ] {
            assert!(AddressClass::of(ip(a), &host).never(), "{a}");
        }
        for a in [
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "100.64.0.1",
            "fd00::1",
        ] {
            assert_eq!(AddressClass::of(ip(a), &host), AddressClass::Private, "{a}");
        }
        assert_eq!(
            AddressClass::of(ip("203.0.113.80"), &host),
            AddressClass::Public
        );
    }

    #[test]
    fn admit_when_internet_then_public_only() {
        let e = Egress::Internet { extra: vec![] };
        assert_eq!(e.admit(ip("203.0.113.80"), 443, &[], &[]), Admission::Open);
        assert!(matches!(
            e.admit(ip("10.0.0.1"), 443, &[], &[]),
            Admission::Deny(_)
        ));
        assert!(matches!(
            e.admit(ip("169.254.169.254"), 80, &[], &[]),
            Admission::Deny(_)
        ));
    }

    #[test]
    fn admit_when_operator_allows_a_private_net_then_internet_reaches_it() {
        let e = Egress::Internet {
            extra: vec!["10.9.0.0/24:3142".parse().expect("entry")],
        };
        assert_eq!(e.admit(ip("10.9.0.7"), 3142, &[], &[]), Admission::Open);
        assert!(matches!(
            e.admit(ip("10.9.0.7"), 22, &[], &[]),
            Admission::Deny(_)
        ));
    }

    #[test]
    fn admit_when_name_allowed_then_only_its_resolved_address_and_port() {
        let e = allow(&["*.pypi.org:443"]);
        let names = vec!["files.pypi.org".to_string()];
        assert_eq!(
            e.admit(ip("203.0.113.9"), 443, &names, &[]),
            Admission::Named(names.clone())
        );
        assert!(matches!(
            e.admit(ip("203.0.113.9"), 80, &names, &[]),
            Admission::Deny(_)
        ));
        assert!(matches!(
            e.admit(ip("203.0.113.10"), 443, &[], &[]),
            Admission::Deny(_)
        ));
        assert!(e.may_resolve("files.pypi.org"));
        assert!(!e.may_resolve("pypi.org"));
        assert!(!e.may_resolve("evil.example"));
    }

    #[test]
    fn admit_when_nothing_then_everything_is_denied() {
        assert!(matches!(
            Egress::None.admit(ip("203.0.113.9"), 443, &[], &[]),
            Admission::Deny(_)
        ));
        assert!(!Egress::None.may_resolve("example.com"));
    }

    proptest! {
        #[test]
        fn parse_when_any_text_then_never_panics(s in "\\PC{0,40}") {
            let _ = s.parse::<Allow>();
        }

        #[test]
        fn admit_when_loopback_or_link_local_then_denied_whatever_the_policy(
            last in 0u8..=255, port in 1u16..,
        ) {
            let everything = allow(&["0.0.0.0/0", "::/0"]);
            for a in [IpAddr::V4(Ipv4Addr::new(127, 0, 0, last)), IpAddr::V4(Ipv4Addr::new(169, 254, 169, last))] {
                prop_assert!(matches!(everything.admit(a, port, &[], &[]), Admission::Deny(_)));
            }
        }
    }
}
