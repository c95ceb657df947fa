//! The `lb` command line. It lives in the library so that the test suite can build the very same
//! binary (and kill it with SIGKILL); `src/main.rs` only calls [`main`]. The commands that are
//! only a command live here: [`check`] (`lb check`), [`decap`] (`lb decap`), [`overrides`]
//! (`lb drain`, `lb weight`...).
//!
//! May use: every layer (the top one).
pub mod check;
pub mod decap;
pub mod overrides;

use std::{net::SocketAddr, path::PathBuf, process::ExitCode, time::Duration};

use clap::{Args, Parser, Subcommand};

use crate::{
    agent::run::{self, RunOptions},
    cli::overrides::Change,
    kernel::inspect::Pinned,
    kernel::program::DEFAULT_PIN_DIR,
    model::desired::Protocol,
    observe::show::{self, Format, backends, explain, stats},
};

/// Why a command failed: the error of the layer that failed, or what the command line refuses.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// What the command refuses to do, and what to do instead.
    #[error("{0}")]
    Refused(String),
    #[error(transparent)]
    Run(#[from] run::RunError),
    #[error(transparent)]
    Show(#[from] show::ShowError),
    #[error(transparent)]
    Top(#[from] crate::observe::top::TopError),
    #[error(transparent)]
    Decap(#[from] crate::kernel::decap::DecapError),
    #[error(transparent)]
    Overrides(#[from] crate::cli::overrides::CommandError),
    #[error(transparent)]
    Rollback(#[from] crate::kernel::migrate::RollbackError),
    #[error(transparent)]
    PinDir(#[from] crate::kernel::pindir::PinDirError),
    #[error(transparent)]
    Inspect(#[from] crate::kernel::inspect::InspectError),
    #[error(transparent)]
    Json(#[from] serde_json::Error),
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

type Result<T, E = CliError> = std::result::Result<T, E>;

const DEFAULT_STATE_DIR: &str = "/run/lb";

/// `lb --version`: the release, the schema of every map it pins, and the releases whose pins
/// it takes over (see [`crate::kernel::migrate`]).
static LONG_VERSION: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    use crate::kernel::migrate::schema;
    let releases: Vec<&str> = schema::RELEASES.iter().map(|r| r.version).collect();
    format!(
        "{}\nmap schemas: {}\nupgrades from and rolls back to (pins kept): {}",
        env!("CARGO_PKG_VERSION"),
        schema::summary(),
        releases.join(", ")
    )
});

#[derive(Parser)]
#[command(
    name = "lb",
    version,
    long_version = LONG_VERSION.as_str(),
    about = "An XDP layer-4 load balancer: weighted Maglev, direct server return, pinned state",
    long_about = "An XDP layer-4 load balancer. `lb run` is the agent: it loads the XDP program, \
                  keeps its maps in step with a config file and pins them, so that traffic keeps \
                  flowing when the agent stops. The other commands read the pinned maps of a \
                  running agent from a separate process."
)]
struct Cli {
    /// Where the agent pins its maps and links (bpffs).
    #[arg(long, global = true, default_value = DEFAULT_PIN_DIR, env = "LB_PIN_DIR")]
    pin_dir: PathBuf,
    /// Where the agent writes status.json (itself, for `lb status`; configured weights and
    /// health, for `lb backends`).
    #[arg(long, global = true, default_value = DEFAULT_STATE_DIR, env = "LB_STATE_DIR")]
    state_dir: PathBuf,
    /// How log lines are written to stderr: text (coloured on a terminal only), or json (one
    /// object a line, for log collectors).
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text, env = "LB_LOG_FORMAT")]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

/// `lb run`'s options.
#[derive(Args)]
struct RunArgs {
    /// The config file (YAML; see lb.example.yaml). With --kubernetes it holds the node
    /// settings only.
    #[arg(long, short)]
    config: PathBuf,
    /// Take VIPs from Kubernetes: Services labelled `lb.dev/class: <class>`, their
    /// EndpointSlices and UpstreamPolicies (in-cluster config, or KUBECONFIG).
    #[arg(long)]
    kubernetes: bool,
    /// The class of Services this agent serves (with --kubernetes).
    #[arg(long, default_value = crate::sources::k8s::translate::DEFAULT_CLASS, requires = "kubernetes")]
    class: String,
    /// Serve the Gateway API's GatewayClasses with this controllerName (with --kubernetes).
    #[arg(long, default_value = crate::sources::k8s::gateway::DEFAULT_CONTROLLER, requires = "kubernetes")]
    gateway_controller: String,
    /// This node's name, for externalTrafficPolicy: Local (with --kubernetes; the
    /// DaemonSet sets it from the downward API).
    #[arg(long, env = "NODE_NAME", requires = "kubernetes")]
    node_name: Option<String>,
    /// This node's addresses, comma-separated (one IPv4, one IPv6), in place of the
    /// config's node.source_v4 / source_v6 (a DaemonSet sets HOST_IPS from status.hostIPs).
    #[arg(long, env = "HOST_IPS", value_delimiter = ',')]
    source: Vec<std::net::IpAddr>,
    /// The status writer's Lease (with --kubernetes).
    #[command(flatten)]
    lease: crate::sources::k8s::LeaseFlags,
    /// On SIGTERM, if this DaemonSet (in the agent's namespace) is gone or being deleted
    /// (uninstalled), detach and remove the pins as `lb down` does; while it exists (a rolling
    /// update) they stay for the next agent (with --kubernetes).
    #[arg(long, value_name = "DAEMONSET", requires = "kubernetes")]
    down_when_deleted: Option<String>,
}

#[derive(Subcommand)]
enum Command {
    /// Run the agent (needs root).
    ///
    /// Loads (or adopts) the program and its pinned maps, applies the config, attaches to the
    /// configured interfaces, runs health checks, and reloads on SIGHUP or when the file changes.
    /// A config with problems is refused and the previous one keeps serving. On SIGTERM the agent
    /// exits and traffic keeps flowing; `lb down` stops it.
    Run(RunArgs),
    /// Detach the program from every interface and remove the pinned maps (flow table included).
    ///
    /// Refused while an agent runs on the pin dir (stop it first: it exits leaving traffic
    /// flowing); --force removes them from under it.
    Down {
        /// Remove the pins even while an agent holds them (it keeps running on unpinned maps).
        #[arg(long)]
        force: bool,
    },
    /// Leave the pins as an older release reads them, before its agent starts on them (a
    /// rollback on a bare host): converts down every map whose schema that release does not read.
    /// Refused while an agent runs on the pins (stop it first: traffic keeps flowing).
    Migrate {
        /// The release the pins are for, e.g. 0.1.0.
        #[arg(long, value_name = "VERSION")]
        to_release: semver::Version,
    },
    /// Counters: global (every packet ends in one verdict), per VIP, per backend.
    Stats {
        #[command(flatten)]
        out: Output,
        /// Print rates per second every INTERVAL instead (global, per VIP, per backend of each
        /// VIP), each block stamped with the time; with `-o json`, one JSON object per line.
        /// Seconds (0.5) or a duration (500ms, 2s), as `lb top --interval`; at least 100ms.
        #[arg(long, value_name = "INTERVAL", value_parser = crate::observe::top::parse_interval)]
        watch: Option<Duration>,
    },
    /// Each VIP's backends: configured weight, health, share of table slots, traffic.
    Backends {
        #[command(flatten)]
        out: Output,
    },
    /// Each backend's next hop as the agent resolved it (egress interface, MAC addresses, MTU,
    /// or no neighbour / local / unreachable / unresolved), and the resolver's figures.
    Nexthops {
        #[command(flatten)]
        out: Output,
    },
    /// Entries of the flow tables (client -> VIP, the backend the flow is pinned to, its state
    /// and, in NAT mode, its source port towards the backend), and how many there are in all.
    Flows {
        /// Only flows to this VIP: ADDRESS:PORT or [V6]:PORT, or the label lb prints for it
        /// (192.0.2.10:80/tcp).
        #[arg(long)]
        vip: Option<show::flows::VipArg>,
        /// Only flows pinned to this backend: ADDRESS or ADDRESS:PORT.
        #[arg(long)]
        backend: Option<show::flows::Endpoint>,
        /// Only flows of this client: ADDRESS or ADDRESS:PORT.
        #[arg(long)]
        client: Option<show::flows::Endpoint>,
        /// Only flows in this state (what the program does with their next packet).
        #[arg(long, value_enum)]
        state: Option<show::flows::FlowState>,
        /// Show at most this many (the total counts them all); 0: all of them.
        #[arg(long, default_value_t = 100)]
        limit: usize,
        #[command(flatten)]
        out: Output,
    },
    /// Which backend a flow gets, and why: its flow entry, its client's affinity, or hash -> slot -> backend.
    Explain {
        /// Client address, with a port for VIPs that hash the 5-tuple (10.0.0.1:40000, [2001:db8::1]:40000).
        source: String,
        /// VIP address and port.
        destination: SocketAddr,
        /// tcp or udp.
        protocol: Protocol,
        /// Explain a TCP SYN (a new connection), which never follows a flow entry, instead of a
        /// packet of an established flow.
        #[arg(long)]
        syn: bool,
        #[command(flatten)]
        out: Output,
    },
    /// The agent: running or not (pid, uptime), its config and last reload, each interface
    /// and whether lb's program is attached there now, sizes, VIPs, and how full the flow
    /// tables are.
    Status {
        #[command(flatten)]
        out: Output,
    },
    /// A live view: per VIP packets, new flows and drops per second; per backend its share of
    /// new flows next to its share of the weights, its health, and the flows still pinned to it
    /// while it drains. q, Esc or Ctrl-C quits; the arrows scroll.
    Top {
        /// Time between readings: seconds (0.5) or a duration (500ms, 2s).
        #[arg(long, default_value = "1s", value_parser = crate::observe::top::parse_interval)]
        interval: Duration,
        /// Print one screen as plain text after one interval, and exit (for scripts).
        #[arg(long)]
        once: bool,
        /// With --once: text (default) or json (the screen's figures: rates per second, shares
        /// as fractions, times in seconds).
        #[arg(short, long = "output", value_enum, default_value_t = TextOrJson::Text, requires = "once")]
        output: TextOrJson,
    },
    /// Check a config without running it: exit 0 if `lb run` would take it, 1 if not.
    ///
    /// Prints every problem and warning with its path (`vips[0].backends[1].weight: ...`), the
    /// kernel memory the maps of the config's sizes need (refused over
    /// node.kernel_memory_limit), and whether node.interfaces exist here and the pin dir is on a
    /// bpffs. With root (or CAP_BPF and CAP_PERFMON) it also proves that the pin dir is
    /// writable and that this kernel loads and verifies the program with the config's sizes
    /// (node.table_size, ...); without, it says what it skipped.
    Check {
        /// The config file (YAML; see lb.example.yaml).
        #[arg(long, short)]
        config: PathBuf,
        /// text (default) or json: `{"config", "valid", "errors", "warnings", "host",
        /// "skipped"}` (each a list but config and valid), the same exit status.
        #[arg(short, long = "output", value_enum, default_value_t = TextOrJson::Text)]
        output: TextOrJson,
    },
    /// Drain a backend of a VIP on the running agent: weight 0 until `lb undrain`; its
    /// established flows stay on it, new flows go to the other backends.
    ///
    /// Kept by the agent across reloads and restarts, shown by `lb status`, `lb backends` and
    /// `lb top`; a config that gives the backend another weight, or removes it, clears it.
    Drain {
        #[command(flatten)]
        target: OverrideTarget,
    },
    /// Give a backend back its configured weight (undoes `lb drain` and `lb weight`).
    Undrain {
        #[command(flatten)]
        target: OverrideTarget,
    },
    /// Give a backend of a VIP another weight than the config's on the running agent, until
    /// `lb undrain` (or a config that gives it another weight).
    Weight {
        #[command(flatten)]
        target: OverrideTarget,
        /// The weight (0..=65535; 0 is a drain).
        #[arg(value_parser = clap::value_parser!(u32).range(0..=65_535))]
        weight: u32,
    },
    /// On a DSR backend: attach, detach or list `lb_decap`, or print the backend recipe.
    ///
    /// `lb_decap` is the XDP program that decapsulates what lb sends a backend (IPIP, IP6IP6 and
    /// the mixed kinds), for kernels without tunnel devices. It stays attached after lb exits
    /// (its link is pinned in --decap-dir). It needs root, or CAP_BPF and CAP_NET_ADMIN, and no
    /// agent. Without a command: `lb decap status`.
    Decap(crate::cli::decap::DecapArgs),
    /// Print the CustomResourceDefinition of lb's UpstreamPolicy (YAML, for `kubectl apply -f -`).
    Crd,
    /// Print a completion script for a shell: `lb completions bash > /etc/bash_completion.d/lb`
    /// (zsh: a file named `_lb` on `$fpath`; fish: `~/.config/fish/completions/lb.fish`).
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Print lb's manual page (roff): `lb man > /usr/local/share/man/man1/lb.1`, or
    /// `lb man | man -l -` to read it now.
    Man,
}

/// The backend of a VIP that `lb drain`, `lb undrain` or `lb weight` changes.
#[derive(Args)]
struct OverrideTarget {
    /// The VIP: its name, or ADDRESS:PORT, or the label lb prints (192.0.2.10:80/tcp).
    vip: crate::cli::overrides::VipQuery,
    /// The backend: ADDRESS (or ADDRESS:PORT).
    backend: show::flows::Endpoint,
    /// How long to wait for the agent to apply the change before taking it back: seconds (0.5)
    /// or a duration (500ms, 2s), as `lb top --interval`.
    #[arg(long, default_value = "10s", value_parser = crate::observe::top::parse_interval)]
    wait: Duration,
}

impl OverrideTarget {
    fn run(self, state_dir: &std::path::Path, change: crate::cli::overrides::Change) -> Result<()> {
        let said =
            crate::cli::overrides::run(state_dir, &self.vip, self.backend, change, self.wait)?;
        println!("{said}");
        Ok(())
    }
}

/// `-o` of `lb check` and `lb top --once`: text or json.
#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum TextOrJson {
    Text,
    Json,
}

/// How an inspecting command prints: `-o table|wide|json` (`--json` is kept as `-o json`).
#[derive(Args, Clone, Copy)]
struct Output {
    /// table (default), wide (more columns: ids, generations, slots) or json (for scripts).
    #[arg(short, long = "output", value_enum, default_value_t = Format::Table)]
    output: Format,
    /// The same as `-o json`.
    #[arg(long, hide = true)]
    json: bool,
}

impl Output {
    fn format(self) -> Format {
        if self.json { Format::Json } else { self.output }
    }
}

/// Runs the CLI with the process's arguments.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    if !matches!(cli.command, Command::Run { .. }) {
        // `lb stats | head` should end quietly, as other Unix tools do.
        // SAFETY: restoring the default disposition of SIGPIPE before any thread starts.
        unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    }
    init_logs(cli.log_format);
    match dispatch(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("lb: {}", crate::error_chain(&e));
            if let Some(why) = crate::kernel::privilege::explain(&e) {
                eprintln!("lb: {why}");
            }
            ExitCode::FAILURE
        }
    }
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

/// Logs to stderr, filtered by RUST_LOG (default `info`). Text is coloured only on a terminal
/// (and without NO_COLOR), so that files and journals get no escape codes.
fn init_logs(format: LogFormat) {
    use std::io::IsTerminal as _;
    let filter =
        tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into());
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => {
            let no_color = std::env::var_os("NO_COLOR").is_some_and(|v| !v.is_empty());
            logs.with_ansi(std::io::stderr().is_terminal() && !no_color)
                .init()
        }
        LogFormat::Json => logs.json().init(),
    }
}

fn dispatch(cli: Cli) -> Result<()> {
    let pins = cli.pin_dir;
    match cli.command {
        Command::Run(args) => run_agent(args, pins, cli.state_dir),
        Command::Migrate { to_release } => migrate(&pins, &to_release),
        Command::Down { force } => down(&pins, &cli.state_dir, force),
        c @ (Command::Stats { .. }
        | Command::Backends { .. }
        | Command::Nexthops { .. }
        | Command::Flows { .. }
        | Command::Explain { .. }
        | Command::Status { .. }) => Ok(inspect(c, &pins, &cli.state_dir)?),
        Command::Top {
            interval,
            once,
            output,
        } => top(
            &Pinned::open(&pins)?,
            &cli.state_dir,
            interval,
            once,
            output,
        ),
        Command::Drain { target } => target.run(&cli.state_dir, Change::Drain),
        Command::Undrain { target } => target.run(&cli.state_dir, Change::Undo),
        Command::Weight { target, weight } => target.run(&cli.state_dir, Change::Weight(weight)),
        Command::Decap(args) => {
            println!("{}", crate::cli::decap::run(args)?.trim_end());
            Ok(())
        }
        Command::Crd => {
            print!("{}", crate::sources::k8s::policy::crd_yaml());
            Ok(())
        }
        Command::Completions { shell } => {
            let mut cli = <Cli as clap::CommandFactory>::command();
            clap_complete::generate(shell, &mut cli, "lb", &mut std::io::stdout());
            Ok(())
        }
        Command::Man => Ok(
            clap_mangen::Man::new(<Cli as clap::CommandFactory>::command())
                .render(&mut std::io::stdout())?,
        ),
        Command::Check { config, output } => check(&config, &pins, output),
    }
}

/// The commands that read the pinned maps and the status file.
fn inspect(
    command: Command,
    pins: &std::path::Path,
    state_dir: &std::path::Path,
) -> show::Result<()> {
    match command {
        Command::Stats { out, watch } => {
            let p = Pinned::open(pins)?;
            let names = show::VipNames::read(state_dir).with_ranges(&p);
            match watch {
                Some(every) => show::watch::watch(&p, &names, every, out.format()),
                None => stats(&p, &names, out.format()),
            }
        }
        Command::Backends { out } => backends(&Pinned::open(pins)?, state_dir, out.format()),
        Command::Nexthops { out } => {
            crate::observe::nexthop::nexthops(&Pinned::open(pins)?, pins, state_dir, out.format())
        }
        Command::Flows {
            vip,
            backend,
            client,
            state,
            limit,
            out,
        } => {
            let filter = show::flows::Filter {
                vip,
                backend,
                client,
                state,
            };
            let limit = if limit == 0 { usize::MAX } else { limit };
            let p = Pinned::open(pins)?;
            let names = show::VipNames::read(state_dir).with_ranges(&p);
            show::flows::flows(&p, &names, filter, limit, out.format())
        }
        Command::Explain {
            source,
            destination,
            protocol,
            syn,
            out,
        } => {
            let p = Pinned::open(pins)?;
            let names = show::VipNames::read(state_dir).with_ranges(&p);
            explain(
                &p,
                &source,
                destination,
                protocol,
                syn,
                &names,
                out.format(),
            )
        }
        Command::Status { out } => show::status::status(pins, state_dir, out.format()),
        _ => unreachable!("not an inspecting command"),
    }
}

/// `lb run`: the agent, on a runtime of its own.
fn run_agent(a: RunArgs, pin_dir: PathBuf, state_dir: PathBuf) -> Result<()> {
    let kubernetes = match (a.kubernetes, a.node_name) {
        (false, _) => None,
        (true, Some(node_name)) if !node_name.is_empty() => {
            Some(crate::sources::k8s::KubeOptions {
                class: a.class,
                node_name,
                gateway_controller: a.gateway_controller,
                lease: a.lease,
                down_when_deleted: a.down_when_deleted,
            })
        }
        (true, _) => {
            return Err(CliError::Refused(
                "--kubernetes needs this node's name: set NODE_NAME (the DaemonSet takes it from spec.nodeName) or --node-name"
                    .to_string(),
            ));
        }
    };
    Ok(
        tokio::runtime::Runtime::new()?.block_on(run::run(RunOptions {
            config: a.config,
            pin_dir,
            state_dir,
            kubernetes,
            sources: a.source,
        }))?,
    )
}

/// `lb migrate --to-release`: leaves the pins as an older release reads them.
fn migrate(pins: &std::path::Path, to_release: &semver::Version) -> Result<()> {
    if !pins.exists() {
        println!("nothing pinned in {}", pins.display());
        return Ok(());
    }
    let Some(_lock) = crate::kernel::pindir::PinLock::try_lock(pins)? else {
        return Err(CliError::Refused(format!(
            "an lb agent is running on {}: stop it first (it exits leaving traffic flowing)",
            pins.display()
        )));
    };
    println!(
        "{}",
        crate::kernel::migrate::prepare_rollback(pins, to_release)?
    );
    Ok(())
}

/// `lb down`: detaches and unpins (`force`: even while an agent holds the pins).
fn down(pins: &std::path::Path, state_dir: &std::path::Path, force: bool) -> Result<()> {
    let done = match force {
        true => run::down(pins, state_dir)?,
        false => run::down_unless_running(pins, state_dir)?,
    };
    if done.is_empty() {
        println!("nothing pinned in {}", pins.display());
    }
    for d in done {
        println!("{d}");
    }
    Ok(())
}

/// `lb top`: live, or one frame (`--once`).
fn top(
    p: &Pinned,
    state_dir: &std::path::Path,
    interval: Duration,
    once: bool,
    output: TextOrJson,
) -> Result<()> {
    if !once {
        return Ok(crate::observe::top::live(p, state_dir, interval)?);
    }
    let frame = crate::observe::top::once(p, state_dir, interval)?;
    match output {
        TextOrJson::Json => println!("{}", serde_json::to_string_pretty(&frame)?),
        TextOrJson::Text => print!("{}", crate::observe::top::ui::to_text(&frame)),
    }
    Ok(())
}

/// `lb check`: the report, then valid or not (an error: exit status 1).
fn check(config: &std::path::Path, pins: &std::path::Path, output: TextOrJson) -> Result<()> {
    let report = crate::cli::check::check(config, pins);
    if output == TextOrJson::Json {
        #[derive(serde::Serialize)]
        struct Json<'a> {
            config: String,
            valid: bool,
            #[serde(flatten)]
            report: &'a crate::cli::check::Report,
        }
        let v = Json {
            config: config.display().to_string(),
            valid: report.ok(),
            report: &report,
        };
        println!("{}", serde_json::to_string_pretty(&v)?);
        if !report.ok() {
            return Err(CliError::Refused(format!(
                "{}: {} problem(s)",
                config.display(),
                report.errors.len()
            )));
        }
        return Ok(());
    }
    print!("{report}");
    if !report.ok() {
        return Err(CliError::Refused(format!(
            "{}: {} problem(s); `lb run` would refuse it",
            config.display(),
            report.errors.len()
        )));
    }
    let warnings = match report.warnings.len() {
        0 => String::new(),
        n => format!(" ({n} warning(s))"),
    };
    println!("{}: valid{warnings}", config.display());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("lb").chain(args.iter().copied()))
    }

    #[test]
    fn stats_watch_takes_the_interval_syntax_of_top() {
        for (arg, ms) in [("500ms", 500), ("0.5", 500), ("2s", 2000), ("1", 1000)] {
            match parse(&["stats", "--watch", arg]).map(|c| c.command) {
                Ok(Command::Stats { watch, .. }) => {
                    assert_eq!(watch, Some(Duration::from_millis(ms)), "{arg}")
                }
                _ => panic!("--watch {arg} refused"),
            }
        }
        assert!(parse(&["stats", "--watch", "50ms"]).is_err(), "below 100ms");
    }

    #[test]
    fn flows_vip_takes_the_label_lb_prints_and_a_bare_address() {
        let vip = |arg: &str| match parse(&["flows", "--vip", arg]).map(|c| c.command) {
            Ok(Command::Flows { vip, .. }) => vip,
            Ok(_) => unreachable!(),
            Err(e) => panic!("--vip {arg}: {e}"),
        };
        let v = vip("192.0.2.10:80/tcp").unwrap();
        assert_eq!(v.addr, "192.0.2.10:80".parse().unwrap());
        assert_eq!(v.proto, Some(Protocol::Tcp));
        let v = vip("[2001:db8::10]:443/udp").unwrap();
        assert_eq!(v.addr, "[2001:db8::10]:443".parse().unwrap());
        assert_eq!(v.proto, Some(Protocol::Udp));
        assert_eq!(vip("192.0.2.10:80").unwrap().proto, None);
        assert!(parse(&["flows", "--vip", "192.0.2.10:80/sctp"]).is_err());
        assert!(parse(&["flows", "--vip", "web"]).is_err());
    }
}
