//! The uplink when `node.interfaces` is not configured: the interface of this network
//! namespace's default route, IPv4 first, else IPv6. Nodes name their uplink differently (eth0,
//! ens5, bond0), so one DaemonSet config cannot; the kernel's routing table knows per node.
//! Read from /proc/net/route and /proc/net/ipv6_route (the reading process's namespace).

use crate::sources::config::NodeSettings;

#[derive(Debug, thiserror::Error)]
pub enum UplinkError {
    #[error(
        "node.interfaces is not set and this host has no default route (IPv4 or IPv6) to take \
         the uplink from: set node.interfaces to the interface VIP traffic arrives on"
    )]
    NoDefaultRoute,
    #[error("reading {path}")]
    Read {
        path: &'static str,
        #[source]
        source: std::io::Error,
    },
}

/// Where the uplink was found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Uplink {
    pub name: String,
    /// "IPv4" or "IPv6": the family of the default route it carries.
    pub family: &'static str,
}

const RTF_UP: u32 = 0x1;
const RTF_REJECT: u32 = 0x200;

/// The interface of the IPv4 default route with the lowest metric, from /proc/net/route's text.
pub fn ipv4_default(text: &str) -> Option<String> {
    text.lines()
        .skip(1)
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            // Iface Destination Gateway Flags RefCnt Use Metric Mask ...
            let flags = u32::from_str_radix(f.get(3)?, 16).ok()?;
            let default = f[1] == "00000000" && *f.get(7)? == "00000000";
            let usable = flags & RTF_UP != 0 && flags & RTF_REJECT == 0;
            (default && usable).then(|| (f[6].parse::<u32>().ok().unwrap_or(u32::MAX), f[0]))
        })
        .min()
        .map(|(_, name)| name.to_string())
}

/// The interface of the IPv6 default route with the lowest metric, from /proc/net/ipv6_route's
/// text (the kernel's unreachable default on lo is a reject route, and left out).
pub fn ipv6_default(text: &str) -> Option<String> {
    text.lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            // dest dest_len src src_len nexthop metric refcnt use flags iface
            let name = *f.get(9)?;
            let flags = u32::from_str_radix(f[8], 16).ok()?;
            let default = f[0].bytes().all(|b| b == b'0') && f[1] == "00";
            let usable = flags & RTF_UP != 0 && flags & RTF_REJECT == 0 && name != "lo";
            let metric = u32::from_str_radix(f[5], 16).ok()?;
            (default && usable).then_some((metric, name))
        })
        .min()
        .map(|(_, name)| name.to_string())
}

/// This namespace's uplink: the IPv4 default route's interface, else the IPv6 one's.
pub fn find() -> Result<Uplink, UplinkError> {
    let read = |path: &'static str| {
        std::fs::read_to_string(path).map_err(|source| UplinkError::Read { path, source })
    };
    if let Some(name) = ipv4_default(&read("/proc/net/route")?) {
        return Ok(Uplink {
            name,
            family: "IPv4",
        });
    }
    // A kernel without IPv6 has no such file: no IPv6 default route either.
    let v6 = std::fs::read_to_string("/proc/net/ipv6_route").unwrap_or_default();
    match ipv6_default(&v6) {
        Some(name) => Ok(Uplink {
            name,
            family: "IPv6",
        }),
        None => Err(UplinkError::NoDefaultRoute),
    }
}

/// When `node.interfaces` is empty, fills it with this host's uplink and says which it chose;
/// a configured list is left as it is (None).
pub fn fill(node: &mut NodeSettings) -> Result<Option<Uplink>, UplinkError> {
    if !node.interfaces.is_empty() {
        return Ok(None);
    }
    let up = find()?;
    node.interfaces = vec![up.name.clone()];
    Ok(Some(up))
}

#[cfg(test)]
mod tests {
    use super::*;

    const ROUTE: &str =
        "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT
ens6\t00000000\t0102000A\t0003\t0\t0\t200\t00000000\t0\t0\t0
ens5\t00000000\t0101000A\t0003\t0\t0\t100\t00000000\t0\t0\t0
ens5\t0000000A\t00000000\t0001\t0\t0\t100\t00FFFFFF\t0\t0\t0
";

    #[test]
    fn the_ipv4_default_route_with_the_lowest_metric_names_the_uplink() {
        assert_eq!(ipv4_default(ROUTE).as_deref(), Some("ens5"));
        let only_subnet = ROUTE.lines().take(1).chain(ROUTE.lines().skip(3));
        assert_eq!(
            ipv4_default(&only_subnet.collect::<Vec<_>>().join("\n")),
            None
        );
    }

    #[test]
    fn the_ipv6_default_route_names_the_uplink_and_the_unreachable_one_on_lo_does_not() {
        let text = "\
00000000000000000000000000000000 00 00000000000000000000000000000000 00 00000000000000000000000000000000 ffffffff 00000001 00000000 00200200       lo
fd000000000000000000000000000000 40 00000000000000000000000000000000 00 00000000000000000000000000000000 00000100 00000001 00000000 00000001     eth1
00000000000000000000000000000000 00 00000000000000000000000000000000 00 fd000000000000000000000000000001 00000400 00000001 00000000 00000003     eth1
";
        assert_eq!(ipv6_default(text).as_deref(), Some("eth1"));
        assert_eq!(ipv6_default(text.lines().next().unwrap()), None);
    }
}
