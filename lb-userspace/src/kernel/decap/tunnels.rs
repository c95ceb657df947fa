//! The kernel's own tunnel devices, the alternative to `lb_decap` where the kernel has them, and
//! the backend recipe `lb decap recipe` prints.
//!
//! Whether the kernel has them is read, not tried: creating a test tunnel would load the `ipip`
//! module, which adds a `tunl0` device to every network namespace of the host, a side effect a
//! command that only looks must not have. `/sys/module/<name>` exists for a loaded module (and a
//! built-in one with parameters, as both of these have); otherwise the module may be on disk,
//! listed in `/lib/modules/<release>/modules.dep`.

use std::{
    fmt::Write as _,
    net::IpAddr,
    path::{Path, PathBuf},
};

use serde::Serialize;

/// Whether the kernel has a tunnel module.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Module {
    /// Loaded (or built in): its fallback device exists in every network namespace.
    Loaded,
    /// Not loaded, but installed: `modprobe` loads it.
    Installed,
    /// Neither.
    Absent,
}

impl Module {
    fn available(self) -> bool {
        self != Self::Absent
    }

    fn as_str(self) -> &'static str {
        match self {
            Self::Loaded => "loaded",
            Self::Installed => "installed, not loaded",
            Self::Absent => "absent",
        }
    }
}

/// The kernel's IPIP (`ipip`: `tunl0`) and IPv6 (`ip6_tunnel`: `ip6tnl0`) tunnel modules.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct Tunnels {
    pub ipip: Module,
    pub ip6_tunnel: Module,
}

impl Tunnels {
    /// This host's.
    pub fn detect() -> Self {
        let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
        let modules = PathBuf::from("/lib/modules").join(release.trim());
        Self::detect_in(Path::new("/sys/module"), &modules)
    }

    /// Under `sys_module` (`/sys/module`) and `modules` (`/lib/modules/<release>`).
    pub fn detect_in(sys_module: &Path, modules: &Path) -> Self {
        let dep = std::fs::read_to_string(modules.join("modules.dep")).unwrap_or_default();
        let module = |name: &str| {
            if sys_module.join(name).exists() {
                Module::Loaded
            } else if dep.lines().any(|l| listed(l, name)) {
                Module::Installed
            } else {
                Module::Absent
            }
        };
        Self {
            ipip: module("ipip"),
            ip6_tunnel: module("ip6_tunnel"),
        }
    }

    pub fn any(&self) -> bool {
        self.ipip.available() || self.ip6_tunnel.available()
    }

    /// `ipip loaded, ip6_tunnel absent`.
    pub fn summary(&self) -> String {
        format!(
            "ipip {}, ip6_tunnel {}",
            self.ipip.as_str(),
            self.ip6_tunnel.as_str()
        )
    }
}

/// Whether a line of modules.dep (`kernel/net/ipv4/ipip.ko.zst: kernel/net/ipv4/ip_tunnel.ko`)
/// is the module `name`'s own.
fn listed(line: &str, name: &str) -> bool {
    let path = line.split(':').next().unwrap_or_default();
    let file = path.rsplit('/').next().unwrap_or_default();
    file.strip_prefix(name)
        .is_some_and(|rest| rest == ".ko" || rest.starts_with(".ko."))
}

/// The commands that make a host a DSR backend of `vips` on `ifname` with `lb decap attach`,
/// each with why; the tunnel-device alternative too where `tunnels` says the kernel has one.
pub fn recipe(ifname: &str, vips: &[IpAddr], tunnels: &Tunnels) -> String {
    let mut s = String::from(
        "# A DSR backend for lb: it decapsulates what lb sends it and answers the client directly.\n\
         # The VIPs on loopback: local addresses, so the decapsulated packets are delivered here.\n",
    );
    s.push_str(&vip_lines(vips));
    let _ = write!(
        s,
        "# Answer ARP only for the addresses of the interface asked (not the VIPs on lo)...\n\
         sysctl -w net.ipv4.conf.all.arp_ignore=1\n\
         # ...and ask with the interface's own address, never with a VIP a reply leaves from.\n\
         sysctl -w net.ipv4.conf.all.arp_announce=2\n\
         # No reverse-path filter: a client's route back may leave by another interface (the\n\
         # kernel takes the higher of `all` and the interface's value).\n\
         sysctl -w net.ipv4.conf.all.rp_filter=0\n\
         sysctl -w net.ipv4.conf.{ifname}.rp_filter=0\n\
         # Decapsulate (IPIP, IP6IP6, mixed) with lb_decap: its link is pinned, it stays after lb exits.\n\
         lb decap attach {ifname}\n\
         # IPv6 needs nothing more: NDP answers and asks with the interface's own addresses only,\n\
         # and IPv6 has no reverse-path filter.\n"
    );
    s.push_str(&tunnel_alternative(tunnels));
    s
}

/// `ip addr add` of each VIP on lo; placeholders without VIPs.
fn vip_lines(vips: &[IpAddr]) -> String {
    if vips.is_empty() {
        return "ip addr add VIP/32 dev lo             # each IPv4 VIP\n\
                ip addr add VIP6/128 dev lo           # each IPv6 VIP\n"
            .to_string();
    }
    let mut sorted = vips.to_vec();
    sorted.sort_by_key(|v| v.is_ipv6());
    sorted
        .iter()
        .map(|v| {
            let len = if v.is_ipv4() { 32 } else { 128 };
            format!("ip addr add {v}/{len} dev lo\n")
        })
        .collect()
}

/// The tunnel-device way in place of `lb decap attach`, if the kernel has the modules; else a
/// line saying it has not.
fn tunnel_alternative(t: &Tunnels) -> String {
    if !t.any() {
        return format!(
            "# This kernel has no tunnel modules ({}): lb_decap is the way here.\n",
            t.summary()
        );
    }
    let mut s = format!(
        "\n# Or, as this kernel has tunnel modules ({}), its tunnel devices in place of\n\
         # `lb decap attach` (the rest as above):\n",
        t.summary()
    );
    if t.ipip.available() {
        s.push_str(
            "modprobe ipip && ip link set tunl0 up         # IPIP: IPv4 VIPs, IPv4 backends\n\
             sysctl -w net.ipv4.conf.tunl0.rp_filter=0     # packets come in on tunl0, replies leave elsewhere\n",
        );
    }
    if t.ip6_tunnel.available() {
        s.push_str(
            "modprobe ip6_tunnel && ip link set ip6tnl0 up # IP6IP6: IPv6 VIPs, IPv6 backends\n",
        );
    }
    s.push_str("# Mixed families (an IPv6 VIP to an IPv4 backend, or the reverse) need further tunnel\n# devices; lb_decap takes all four kinds.\n");
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tunnels(ipip: Module, ip6_tunnel: Module) -> Tunnels {
        Tunnels { ipip, ip6_tunnel }
    }

    #[test]
    fn a_module_is_loaded_if_sys_module_has_it_and_installed_if_modules_dep_lists_it() {
        let root = std::env::temp_dir().join(format!("lb-tunnels-{}", std::process::id()));
        let (sys, lib) = (root.join("sys"), root.join("lib"));
        std::fs::create_dir_all(sys.join("ipip")).unwrap();
        std::fs::create_dir_all(&lib).unwrap();
        std::fs::write(
            lib.join("modules.dep"),
            "kernel/net/ipv6/ip6_tunnel.ko.zst: kernel/net/ipv6/tunnel6.ko.zst\n\
             kernel/net/ipv4/ip_tunnel.ko.zst:\n",
        )
        .unwrap();
        let t = Tunnels::detect_in(&sys, &lib);
        std::fs::remove_dir_all(&root).unwrap();
        assert_eq!(t, tunnels(Module::Loaded, Module::Installed));
        assert_eq!(
            Tunnels::detect_in(&root.join("none"), &root.join("none")),
            tunnels(Module::Absent, Module::Absent)
        );
    }

    #[test]
    fn a_module_is_listed_by_its_own_file_name_only() {
        assert!(listed(
            "kernel/net/ipv4/ipip.ko: kernel/net/ipv4/ip_tunnel.ko",
            "ipip"
        ));
        assert!(listed("kernel/net/ipv4/ipip.ko.xz:", "ipip"));
        assert!(!listed(
            "kernel/net/ipv4/ip_tunnel.ko: kernel/net/ipv4/ipip.ko",
            "ipip"
        ));
        assert!(!listed("kernel/net/ipv6/ip6_tunnel.ko:", "ip6_tunnel_x"));
    }

    #[test]
    fn the_recipe_puts_each_vip_on_lo_with_its_prefix_and_attaches_to_the_interface() {
        let vips = [
            "192.0.2.10".parse().unwrap(),
            "2001:db8::10".parse().unwrap(),
        ];
        let r = recipe("ens3", &vips, &tunnels(Module::Absent, Module::Absent));
        for line in [
            "ip addr add 192.0.2.10/32 dev lo",
            "ip addr add 2001:db8::10/128 dev lo",
            "sysctl -w net.ipv4.conf.all.arp_ignore=1",
            "sysctl -w net.ipv4.conf.all.arp_announce=2",
            "sysctl -w net.ipv4.conf.all.rp_filter=0",
            "sysctl -w net.ipv4.conf.ens3.rp_filter=0",
            "lb decap attach ens3",
        ] {
            assert!(r.lines().any(|l| l == line), "no {line:?} in:\n{r}");
        }
        assert!(!r.contains("tunl0"), "{r}");
    }

    #[test]
    fn the_tunnel_alternative_is_given_only_for_the_modules_the_kernel_has() {
        let r = recipe("eth0", &[], &tunnels(Module::Installed, Module::Absent));
        assert!(r.contains("modprobe ipip && ip link set tunl0 up"), "{r}");
        assert!(r.contains("net.ipv4.conf.tunl0.rp_filter=0"), "{r}");
        assert!(!r.contains("ip6tnl0"), "{r}");
        let r = recipe("eth0", &[], &tunnels(Module::Absent, Module::Loaded));
        assert!(
            r.contains("ip link set ip6tnl0 up") && !r.contains("tunl0 up"),
            "{r}"
        );
    }
}
