//! The routing daemons of the scale-out lab: BIRD 2 processes in namespaces, and their
//! configs (a node's: lb's table out over BGP; the router's: every node in, as multipath routes).

use std::{
    fs::File,
    os::unix::process::CommandExt as _,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::Duration,
};

use super::{TABLE, node_v4, node_v6};
use crate::netns::NetNs;

/// BFD: 100 ms, 5 missed packets (a node's loss is noticed in about half a second).
pub const BFD: &str = "min rx interval 100 ms; min tx interval 100 ms; multiplier 5;";
/// BGP timers: the session itself (BFD notices a lost link first), and how soon it is retried.
pub const BGP_TIMERS: &str =
    "hold time 3; keepalive time 1; connect retry time 1; error wait time 1, 2;";

/// A BIRD daemon running in the foreground in a namespace; killed on drop.
pub struct Bird {
    child: Child,
    pub socket: PathBuf,
    pub dir: PathBuf,
}

impl Bird {
    /// Writes `conf` to `dir`/bird.conf and starts `bird -f` on it in `ns`.
    pub fn start(ns: &NetNs, dir: &Path, conf: &str) -> Self {
        let path = dir.join("bird.conf");
        let socket = dir.join("bird.ctl");
        std::fs::write(&path, conf).unwrap();
        let stderr = dir.join("bird.stderr");
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &ns.name, "bird", "-f", "-c"])
            .arg(&path)
            .arg("-s")
            .arg(&socket)
            .stdout(Stdio::null())
            .stderr(File::create(&stderr).unwrap());
        // SAFETY: prctl is async-signal-safe. A test process killed outright (no destructors)
        // takes its daemons with it instead of leaving them in deleted namespaces.
        unsafe {
            cmd.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd
            .spawn()
            .expect("starting bird (BIRD 2: `cargo xtask setup` installs it)");
        let mut b = Self {
            child,
            socket,
            dir: dir.to_path_buf(),
        };
        std::thread::sleep(Duration::from_millis(100));
        if let Ok(Some(status)) = b.child.try_wait() {
            panic!(
                "bird exited ({status}): {}",
                std::fs::read_to_string(&stderr).unwrap_or_default()
            );
        }
        b
    }

    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// `birdc <args>` against this daemon, for failure messages.
    pub fn birdc(&self, args: &[&str]) -> String {
        match Command::new("birdc")
            .arg("-s")
            .arg(&self.socket)
            .args(args)
            .output()
        {
            Ok(o) => String::from_utf8_lossy(&o.stdout).into_owned(),
            Err(e) => format!("birdc: {e}"),
        }
    }
}

impl Drop for Bird {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// BIRD on a node: learns lb's routes from table [`TABLE`] and announces them to the router.
pub fn node_bird_conf(i: usize, log: &Path) -> String {
    format!(
        r#"router id {id};
log "{log}" {{ info, remote, warning, error, auth, fatal, bug }};
protocol device {{ }}
protocol bfd {{ interface "eth0" {{ {BFD} }}; }}
# lb keeps one route per VIP it announces in table {TABLE}; `learn` takes routes made by others.
protocol kernel lb4 {{ kernel table {TABLE}; learn; ipv4 {{ import all; export none; }}; }}
protocol kernel lb6 {{ kernel table {TABLE}; learn; ipv6 {{ import all; export none; }}; }}
template bgp upstream {{ local as 65001; bfd on; {BGP_TIMERS} }}
protocol bgp router4 from upstream {{
  neighbor 10.20.0.1 as 65000;
  ipv4 {{ import none; export all; next hop self; }};
}}
protocol bgp router6 from upstream {{
  neighbor fd20::1 as 65000;
  ipv6 {{ import none; export all; next hop self; }};
}}
"#,
        id = node_v4(i),
        log = log.display()
    )
}

/// BIRD on the router: one session per node and family; the VIPs go into the main table as
/// multipath routes.
pub fn router_bird_conf(nodes: usize, log: &Path) -> String {
    let mut c = format!(
        r#"router id 10.20.0.1;
log "{log}" {{ info, remote, warning, error, auth, fatal, bug }};
protocol device {{ }}
protocol bfd {{ interface "br0" {{ {BFD} }}; }}
protocol kernel {{ merge paths on; ipv4 {{ import none; export all; }}; }}
protocol kernel {{ merge paths on; ipv6 {{ import none; export all; }}; }}
template bgp lbnode {{ local as 65000; bfd on; {BGP_TIMERS} }}
"#,
        log = log.display()
    );
    for i in 0..nodes {
        c.push_str(&format!(
            "protocol bgp n{n}v4 from lbnode {{ neighbor {} as 65001; ipv4 {{ import all; export none; }}; }}
protocol bgp n{n}v6 from lbnode {{ neighbor {} as 65001; ipv6 {{ import all; export none; }}; }}
",
            node_v4(i),
            node_v6(i),
            n = i + 1
        ));
    }
    c
}
