//! The nftables rules of a VM's namespace.
//!
//! Inside the namespace only QEMU (its user-mode network stack) and kilnd's own sockets
//! live. Every connection QEMU opens for the guest is locally generated there, so the
//! `output` hook sees all of it: TCP is redirected to the egress gateway's listener, DNS to
//! its resolver, and everything else is refused. kilnd's connections to QEMU's forwards
//! come from [`crate::netns::KILND_SOURCE`] and are the only other traffic admitted.

use crate::netns::{Netns, GATEWAY_ADDR, KILND_SOURCE};
use crate::NetError;

/// Where the gateway listens inside the namespace (`None`: no egress at all).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GatewayPorts {
    /// TCP listener receiving every redirected guest connection.
    pub tcp: u16,
    /// UDP resolver receiving every DNS query.
    pub dns: u16,
}

/// The ruleset text, replacing any earlier one in one transaction.
pub fn ruleset(gateway: Option<GatewayPorts>) -> String {
    let [a, b, c, d] = KILND_SOURCE;
    let kilnd = format!("{a}.{b}.{c}.{d}");
    let [a, b, c, d] = GATEWAY_ADDR;
    let gw = format!("{a}.{b}.{c}.{d}");
    let mut nat = String::new();
    let mut accept = String::new();
    if let Some(g) = gateway {
        nat.push_str(&format!(
            "    meta nfproto ipv4 meta l4proto tcp dnat ip to {gw}:{tcp}\n    meta nfproto ipv4 udp dport 53 dnat ip to {gw}:{dns}\n",
            tcp = g.tcp,
            dns = g.dns
        ));
        accept.push_str(&format!(
            "    ip daddr {gw} tcp dport {tcp} accept\n    ip daddr {gw} udp dport {dns} accept\n",
            tcp = g.tcp,
            dns = g.dns
        ));
    }
    format!(
        "table inet kiln {{}}\n\
         delete table inet kiln\n\
         table inet kiln {{\n\
         \x20 chain nat_out {{\n\
         \x20   type nat hook output priority -100; policy accept;\n\
         \x20   ip saddr {kilnd} return\n\
         {nat}\
         \x20 }}\n\
         \x20 chain filter_out {{\n\
         \x20   type filter hook output priority 0; policy drop;\n\
         \x20   ct state established,related accept\n\
         \x20   ip saddr {kilnd} ip daddr 127.0.0.1 accept\n\
         {accept}\
         \x20   meta l4proto tcp reject with tcp reset\n\
         \x20   reject\n\
         \x20 }}\n\
         }}\n"
    )
}

/// Brings the namespace's loopback up, routes every destination to it (so the guest's
/// connections reach the output hook instead of failing as unreachable), and installs
/// the rules.
pub fn apply(netns: &Netns, gateway: Option<GatewayPorts>) -> Result<(), NetError> {
    netns.run(
        "ip",
        &["-batch", "-"],
        "link set lo up\nroute replace default dev lo src 127.0.0.1\n",
    )?;
    netns.run("nft", &["-f", "-"], &ruleset(gateway))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ruleset_when_no_gateway_then_nothing_is_redirected() {
        let text = ruleset(None);
        assert!(!text.contains("redirect"));
        assert!(text.contains("policy drop"));
    }

    #[test]
    fn ruleset_when_gateway_then_tcp_and_dns_go_to_its_ports() {
        let text = ruleset(Some(GatewayPorts {
            tcp: 4100,
            dns: 4200,
        }));
        assert!(text.contains("meta l4proto tcp dnat ip to 127.0.0.3:4100"));
        assert!(text.contains("udp dport 53 dnat ip to 127.0.0.3:4200"));
        assert!(text.contains("tcp dport 4100 accept"));
    }

    #[test]
    fn apply_when_loaded_then_nft_accepts_it_and_replaces_it() {
        let ns = Netns::create().expect("create (root)");
        apply(&ns, None).expect("first ruleset");
        apply(
            &ns,
            Some(GatewayPorts {
                tcp: 4100,
                dns: 4200,
            }),
        )
        .expect("replacement");
    }
}
