//! Build and test orchestration for lb: `cargo xtask <command>`.
//!
//! xtask depends on nothing that needs the BPF toolchain, so that `cargo xtask setup` can build
//! and run on a machine that does not have it yet.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result, bail};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(about = "Build, test and demo tasks for lb")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install what this machine lacks to build and test lb (idempotent), and mount bpffs.
    Setup {
        /// Only what building needs (for the container image): no test tools, no bpffs.
        #[arg(long)]
        build_only: bool,
    },
    /// Run setup, the lints (rustfmt, clippy) and the whole test suite. Needs root.
    Test {
        /// Skip rustfmt and clippy.
        #[arg(long)]
        no_lint: bool,
        /// Extra arguments for `cargo test` (after `--`), e.g. a test name filter.
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// Run setup, then a live demo in network namespaces on this machine. Needs root.
    Demo,
    /// Run setup, then the benchmarks: prints a table, writes target/bench/results.json. Needs root.
    Bench {
        /// A small, quick run (what the test suite runs).
        #[arg(long)]
        smoke: bool,
        /// Run only these sections, comma-separated: fastpath, forwarding, nat_peer, programs,
        /// maglev, control_plane, memory, migration (writes target/bench/results-<sections>.json).
        #[arg(long, value_name = "SECTIONS")]
        only: Option<String>,
    },
    /// Run one fast-path bench case alone under `perf record` and print where its time goes
    /// (samples inside BPF_PROG_TEST_RUN by innermost function: the program's own code, each
    /// helper, the test-run loop). Needs root and `perf` (Debian's linux-perf).
    Profile {
        /// The case, as the bench table names it (e.g. v4_nat_reply).
        case: String,
        /// How long to run it.
        #[arg(long, default_value_t = 10)]
        secs: u32,
    },
}

fn main() -> Result<()> {
    match Cli::parse().command {
        Cmd::Setup { build_only } => setup(build_only),
        Cmd::Test { no_lint, args } => test(no_lint, &args),
        Cmd::Bench { smoke, only } => {
            setup(false)?;
            require_root("the benchmarks load XDP programs")?;
            let mut c = cargo_release("run", "lb-tests", "lb-bench");
            c.arg("--");
            if smoke {
                c.arg("--smoke");
            }
            if let Some(sections) = only {
                c.args(["--only", &sections]);
            }
            run(&mut c)
        }
        Cmd::Profile { case, secs } => {
            setup(false)?;
            require_root("the profile loads XDP programs and samples the kernel")?;
            profile(&case, secs)
        }
        Cmd::Demo => {
            setup(false)?;
            require_root("the demo attaches XDP programs inside network namespaces")?;
            // The demo runs the real agent binary. It is the tests' debug build (the XDP
            // program in it is optimised all the same): `cargo xtask test` after the demo
            // builds only the tests, not every dependency a second time.
            run(cargo().args([
                "build",
                "--quiet",
                "--package",
                "lb-userspace",
                "--bin",
                "lb",
            ]))?;
            run(cargo()
                .args([
                    "run",
                    "--quiet",
                    "--package",
                    "lb-tests",
                    "--bin",
                    "lb-demo",
                ])
                .env("LB_BIN", workspace_root().join("target/debug/lb")))
        }
    }
}

/// `cargo xtask test`: the lints (unless `no_lint`), then the whole suite with `args`.
fn test(no_lint: bool, args: &[String]) -> Result<()> {
    setup(false)?;
    require_root("the tests load XDP programs and create network namespaces")?;
    if !no_lint {
        run(cargo().args(["fmt", "--all", "--", "--check"]))?;
        run(cargo().args([
            "clippy",
            "--workspace",
            "--all-targets",
            "--",
            "-D",
            "warnings",
        ]))?;
        // The XDP code only exists for the BPF target: lint it there too. (Plain
        // `cargo`, not $CARGO, so that rustup honours `+nightly`.)
        run(Command::new("cargo").current_dir(workspace_root()).args([
            "+nightly",
            "clippy",
            "--package",
            "lb-ebpf",
            "--release",
            "--target",
            "bpfel-unknown-none",
            "-Z",
            "build-std=core",
            "--",
            "-D",
            "warnings",
        ]))?;
    }
    previous_release()?;
    run(cargo().args(["test", "--workspace"]).arg("--").args(args))
}

/// Tools the tests use: `ip`, `ethtool`, `capsh` (the DaemonSet's capability set is proven
/// under it), Python's venv (for kubernetes-validate), tmux (`lb top` is read off its pane) and
/// BIRD 2 (the scale-out lab's routing daemon; the tests start their own, in namespaces) and
/// `nft` (the bench's kube-proxy-style NAT peer writes its ruleset with it, in a namespace), and
/// groff (`lb man`'s page is rendered and linted with it).
const TEST_APT_PACKAGES: &[&str] = &[
    "iproute2",
    "ethtool",
    "libcap2-bin",
    "python3-venv",
    "tmux",
    "bird2",
    "nftables",
    "groff-base",
];
/// The manifest validator the tests run, from PyPI, in a virtualenv under target/.
const KUBERNETES_VALIDATE: &str = "kubernetes-validate==1.37.0";
/// The OpenMetrics reference parser (Python's Prometheus client), which checks the agent's
/// OpenMetrics output in the tests (promtool lints the text format only), in the same virtualenv.
const OPENMETRICS_PARSER: &str = "prometheus-client==0.26.0";
/// The Debian package promtool comes in (with the Prometheus server, which setup leaves out).
const PROMTOOL_PACKAGE: &str = "prometheus";
/// Helm v4's Go SDK for Python: the tests render and lint the chart with Helm's own engine,
/// offline, without a helm binary.
const HELM_SDK: &str = "helm-python-sdk==0.2.2";
/// Where setup installs promtool.
const PROMTOOL: &str = "/usr/local/bin/promtool";

/// Where `cargo xtask setup` puts kubernetes-validate.
fn tools_venv() -> PathBuf {
    workspace_root().join("target/tools/venv")
}

/// Where the installers' own output goes: setup prints one line per step instead.
fn setup_log() -> PathBuf {
    workspace_root().join("target/setup.log")
}

const APT_PACKAGES: &[&str] = &[
    "llvm-22-dev",
    "libpolly-22-dev",
    "libzstd-dev",
    "zlib1g-dev",
];
const BPF_LINKER_VERSION: &str = "0.13.0";
const LLVM_PREFIX: &str = "/usr/lib/llvm-22";

/// Installs only what is missing, saying in one line per step what it checked or installed;
/// what the installers print goes to target/setup.log.
///
/// The Debian packages come first (bpf-linker builds against their LLVM, the Python tools need
/// their venv); then the steps that take long run side by side: building bpf-linker (minutes, on
/// a fresh machine) beside nightly's rust-src, promtool and the Python tools (downloads).
fn setup(build_only: bool) -> Result<()> {
    let wanted: &[&str] = if build_only { &[] } else { TEST_APT_PACKAGES };
    apt_packages(APT_PACKAGES.iter().chain(wanted).copied().collect())?;
    std::thread::scope(|s| {
        let linker = s.spawn(bpf_linker);
        let rest = rust_src().and_then(|()| match build_only {
            true => Ok(()),
            false => promtool().and_then(|()| python_tools()),
        });
        let linker = linker
            .join()
            .unwrap_or_else(|_| bail!("bpf-linker: the step panicked"));
        rest.and(linker)
    })?;
    if !build_only {
        bpffs()?;
    }
    Ok(())
}

/// Nightly's rust-src: the eBPF crate is built by nightly with -Z build-std=core.
fn rust_src() -> Result<()> {
    let installed = output(Command::new("rustup").args([
        "component",
        "list",
        "--toolchain",
        "nightly",
        "--installed",
    ]))
    .context("listing nightly's components (is the nightly toolchain installed?)")?;
    if installed.lines().any(|l| l.starts_with("rust-src")) {
        say("nightly rust-src: present");
        return Ok(());
    }
    say("nightly rust-src: missing, installing");
    install(
        "nightly rust-src",
        Command::new("rustup").args(["component", "add", "rust-src", "--toolchain", "nightly"]),
    )
}

/// bpf-linker, built against Debian's LLVM 22.
fn bpf_linker() -> Result<()> {
    if let Ok(v) = output(Command::new("bpf-linker").arg("--version")) {
        say(&format!("bpf-linker: present ({})", v.trim()));
        return Ok(());
    }
    say(&format!(
        "bpf-linker: missing, building {BPF_LINKER_VERSION} against LLVM 22 (takes a few minutes)"
    ));
    let t = std::time::Instant::now();
    install(
        "bpf-linker",
        cargo()
            .args([
                "install",
                "--quiet",
                "--locked",
                "bpf-linker",
                "--version",
                BPF_LINKER_VERSION,
                "--no-default-features",
                "--features",
                "llvm-22",
            ])
            .env("LLVM_PREFIX", LLVM_PREFIX),
    )?;
    say(&format!(
        "bpf-linker: built in {:.0} s",
        t.elapsed().as_secs_f64()
    ));
    Ok(())
}

/// bpffs at /sys/fs/bpf, where the agent pins its maps and links.
fn bpffs() -> Result<()> {
    let bpffs = Path::new("/sys/fs/bpf");
    if is_bpffs_mounted(bpffs)? {
        say("bpffs: mounted at /sys/fs/bpf");
    } else if is_root() {
        say("bpffs: not mounted, mounting at /sys/fs/bpf");
        install(
            "bpffs",
            Command::new("mount").args(["-t", "bpf", "bpf"]).arg(bpffs),
        )?;
    } else {
        say("bpffs: not mounted (run setup as root to mount it; pinning needs it)");
    }
    Ok(())
}

/// `apt-get update`, once per setup.
fn apt_update(step: &str) -> Result<()> {
    static DONE: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
    if DONE.load(std::sync::atomic::Ordering::Relaxed) {
        return Ok(());
    }
    install(step, Command::new("apt-get").arg("update").arg("-q"))?;
    DONE.store(true, std::sync::atomic::Ordering::Relaxed);
    Ok(())
}

/// Installs the Debian packages of `all` that are missing.
fn apt_packages(all: Vec<&str>) -> Result<()> {
    let missing: Vec<&str> = all.iter().copied().filter(|p| !dpkg_installed(p)).collect();
    if missing.is_empty() {
        say(&format!("Debian packages ({}): present", all.join(", ")));
        return Ok(());
    }
    say(&format!(
        "Debian packages missing: {}; installing",
        missing.join(", ")
    ));
    require_root("installing Debian packages")?;
    apt_update("Debian packages")?;
    install(
        "Debian packages",
        Command::new("apt-get")
            .args(["install", "-y", "-q"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )
}

/// promtool, taken out of Debian's prometheus package: installing the package itself would
/// start a Prometheus server (its init script) and enable it at boot, and pull in a web UI.
fn promtool() -> Result<()> {
    if let Ok(v) = output(Command::new("promtool").arg("--version")) {
        let first = v.lines().next().unwrap_or_default();
        say(&format!("promtool: present ({first})"));
        return Ok(());
    }
    say(&format!(
        "promtool: missing, installing {PROMTOOL} from Debian's {PROMTOOL_PACKAGE} package (the tool alone, no server)"
    ));
    require_root("installing promtool")?;
    let dir = workspace_root().join("target/tools/deb");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let step = "promtool";
    apt_update(step)?;
    install(
        step,
        Command::new("apt-get")
            .args(["download", "-q", PROMTOOL_PACKAGE])
            .current_dir(&dir),
    )?;
    let deb = std::fs::read_dir(&dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.extension().is_some_and(|x| x == "deb"))
        .with_context(|| format!("apt-get download left no .deb in {}", dir.display()))?;
    install(
        step,
        Command::new("dpkg-deb")
            .arg("-x")
            .arg(&deb)
            .arg(dir.join("root")),
    )?;
    let tmp = format!("{PROMTOOL}.tmp");
    std::fs::copy(dir.join("root/usr/bin/promtool"), &tmp)
        .with_context(|| format!("copying promtool to {tmp}"))?;
    std::fs::rename(&tmp, PROMTOOL).with_context(|| format!("installing {PROMTOOL}"))?;
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

/// The Python tools the tests run, in a virtualenv under target/.
fn python_tools() -> Result<()> {
    let python = tools_venv().join("bin/python");
    let tools = [
        (
            "kubernetes-validate",
            KUBERNETES_VALIDATE,
            "import kubernetes_validate",
        ),
        (
            "OpenMetrics parser",
            OPENMETRICS_PARSER,
            "import prometheus_client.openmetrics.parser",
        ),
        ("Helm SDK", HELM_SDK, "import helm_python"),
    ];
    for (name, spec, probe) in tools {
        if output(Command::new(&python).args(["-c", probe])).is_ok() {
            say(&format!("{name}: present ({})", tools_venv().display()));
            continue;
        }
        say(&format!(
            "{name}: missing, installing {spec} into {}",
            tools_venv().display()
        ));
        if !python.exists() {
            install(
                name,
                Command::new("python3")
                    .args(["-m", "venv"])
                    .arg(tools_venv()),
            )?;
        }
        install(
            name,
            Command::new(&python).args(["-m", "pip", "install", "--quiet", spec]),
        )?;
    }
    Ok(())
}

/// Runs an installer of setup's step `step`, its output appended to target/setup.log; if it
/// fails, prints the tail of what it wrote there.
fn install(step: &str, cmd: &mut Command) -> Result<()> {
    use std::io::{Seek as _, Write as _};
    let path = setup_log();
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let mut log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .with_context(|| format!("opening {}", path.display()))?;
    writeln!(log, "\n== {step}: {cmd:?}")?;
    let from = log.seek(std::io::SeekFrom::End(0))?;
    let status = cmd
        .stdout(log.try_clone()?)
        .stderr(log.try_clone()?)
        .status()
        .with_context(|| format!("{step}: starting {cmd:?}"))?;
    if status.success() {
        return Ok(());
    }
    let text = std::fs::read(&path).unwrap_or_default();
    let ours = String::from_utf8_lossy(&text[(from as usize).min(text.len())..]).into_owned();
    let lines: Vec<&str> = ours.lines().collect();
    let tail = &lines[lines.len().saturating_sub(20)..];
    say(&format!(
        "{step}: failed ({status}); the last lines of {}:",
        path.display()
    ));
    for l in tail {
        eprintln!("    {l}");
    }
    bail!("{step}: {cmd:?} failed ({status})")
}

fn is_bpffs_mounted(at: &Path) -> Result<bool> {
    let mounts = std::fs::read_to_string("/proc/mounts").context("reading /proc/mounts")?;
    Ok(mounts.lines().any(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        f.len() > 2 && Path::new(f[1]) == at && f[2] == "bpf"
    }))
}

fn dpkg_installed(pkg: &str) -> bool {
    output(Command::new("dpkg-query").args(["-W", "-f=${Status}", pkg]))
        .map(|s| s.contains("install ok installed"))
        .unwrap_or(false)
}

fn is_root() -> bool {
    // /proc/self/status has "Uid: real effective saved fs"; avoids a libc dependency for one call.
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .map(|l| l.split_whitespace().nth(2) == Some("0"))
        })
        .unwrap_or(false)
}

fn require_root(why: &str) -> Result<()> {
    if !is_root() {
        bail!("this needs root: {why}");
    }
    Ok(())
}

/// Builds the previous release's agent (the commit `release/previous` names) for the upgrade
/// tests, from a worktree at target/previous/src, into this workspace's target dir (so that its
/// dependencies are this build's, not built again), and copies it to target/previous/lb with a
/// stamp naming the commit. tests/src/release.rs uses that copy, or builds it itself (into a
/// target dir of its own) when the tests run without xtask.
fn previous_release() -> Result<()> {
    let root = workspace_root();
    let listed = std::fs::read_to_string(root.join("release/previous"))
        .context("reading release/previous")?;
    let commit = listed.lines().next().unwrap_or_default().trim().to_string();
    let base = root.join("target/previous");
    let (bin, stamp, src) = (base.join("lb"), base.join("built"), base.join("src"));
    let short = &commit[..commit.len().min(12)];
    if bin.exists() && std::fs::read_to_string(&stamp).ok().as_deref() == Some(commit.as_str()) {
        say(&format!("previous release ({short}): built"));
        return Ok(());
    }
    std::fs::create_dir_all(&base)?;
    let git = |dir: &Path, args: &[&str]| output(Command::new("git").current_dir(dir).args(args));
    if git(&root, &["cat-file", "-e", &format!("{commit}^{{commit}}")]).is_err() {
        // A shallow clone: fetch the history the previous release's commit is in.
        say(&format!(
            "previous release ({short}): not in this clone, fetching its history"
        ));
        git(&root, &["fetch", "--quiet", "--unshallow"])
            .context("fetching a shallow clone's history for the previous release")?;
    }
    if src.join(".git").exists() {
        git(&src, &["checkout", "--quiet", "--detach", &commit])?;
    } else {
        git(&root, &["worktree", "prune"])?;
        let at = src.to_str().context("a UTF-8 path")?;
        git(
            &root,
            &["worktree", "add", "--force", "--detach", at, &commit],
        )
        .context("adding the previous release's worktree")?;
    }
    say(&format!(
        "previous release ({short}): building its agent for the upgrade tests"
    ));
    let mut build = cargo();
    build
        .current_dir(&src)
        .env("CARGO_TARGET_DIR", root.join("target"))
        .args([
            "build",
            "--quiet",
            "--package",
            "lb-userspace",
            "--bin",
            "lb",
        ]);
    let t = std::time::Instant::now();
    run(&mut build)?;
    say(&format!(
        "previous release ({short}): built in {:.0} s",
        t.elapsed().as_secs_f64()
    ));
    // target/debug/lb is the old agent now: the next build of this workspace puts its own back.
    std::fs::copy(root.join("target/debug/lb"), &bin).context("copying the previous agent")?;
    std::fs::write(&stamp, &commit)?;
    Ok(())
}

fn say(msg: &str) {
    eprintln!("[xtask] {msg}");
}

fn cargo() -> Command {
    let mut c = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    c.current_dir(workspace_root());
    c
}

/// `cargo <verb> --release --quiet --package <package> --bin <bin>`.
fn cargo_release(verb: &str, package: &str, bin: &str) -> Command {
    let mut c = cargo();
    c.args([
        verb,
        "--release",
        "--quiet",
        "--package",
        package,
        "--bin",
        bin,
    ]);
    c
}

/// `cargo xtask profile`: the bench's `LB_BENCH_PROFILE` mode under `perf record -e cpu-clock`
/// (a software clock: this machine's VM has no hardware counters), then the samples whose stack
/// passes through `bpf_test_run`, counted by the function they were taken in.
fn profile(case: &str, secs: u32) -> Result<()> {
    let data = workspace_root().join("target/bench/perf.data");
    std::fs::create_dir_all(data.parent().unwrap())?;
    run(&mut cargo_release("build", "lb-tests", "lb-bench"))?;
    let bench = workspace_root().join("target/release/lb-bench");
    run(Command::new("perf")
        .args(["record", "-q", "-e", "cpu-clock", "-a", "-g", "-o"])
        .arg(&data)
        .arg("--")
        .arg(&bench)
        .args(["--only", "fastpath"])
        .env("LB_BENCH_PROFILE", case)
        .env("LB_BENCH_PROFILE_SECS", secs.to_string()))?;
    let out = Command::new("perf")
        .args(["script", "-F", "ip,sym", "-i"])
        .arg(&data)
        .output()
        .context("running perf script")?;
    let (total, by_fn) = samples_in_test_run(&String::from_utf8_lossy(&out.stdout));
    if total == 0 {
        bail!("no samples inside bpf_test_run: did the case run?");
    }
    println!("{total} samples inside BPF_PROG_TEST_RUN, by the function they were taken in:");
    for (name, n) in by_fn.iter().take(25) {
        println!("{:6.2} %  {name}", 100.0 * *n as f64 / total as f64);
    }
    Ok(())
}

/// Counts `perf script -F ip,sym` samples (a blank line between them, innermost frame first)
/// that have `bpf_test_run` on their stack, by innermost function, most first.
fn samples_in_test_run(script: &str) -> (usize, Vec<(String, usize)>) {
    let mut counts = std::collections::BTreeMap::<String, usize>::new();
    let mut total = 0;
    for sample in script.split("\n\n") {
        let frames: Vec<&str> = sample
            .lines()
            .filter_map(|l| l.split_whitespace().nth(1))
            .map(|s| s.split('+').next().unwrap_or(s))
            .collect();
        if frames.contains(&"bpf_test_run") {
            total += 1;
            *counts.entry(frames[0].to_string()).or_default() += 1;
        }
    }
    let mut v: Vec<_> = counts.into_iter().collect();
    v.sort_by_key(|(_, n)| std::cmp::Reverse(*n));
    (total, v)
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace")
        .to_path_buf()
}

fn run(cmd: &mut Command) -> Result<()> {
    let status = cmd.status().with_context(|| format!("starting {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed ({status})");
    }
    Ok(())
}

fn output(cmd: &mut Command) -> Result<String> {
    let out = cmd.output().with_context(|| format!("starting {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

#[cfg(test)]
mod profile_tests {
    use super::samples_in_test_run;

    #[test]
    fn only_samples_under_bpf_test_run_count_by_their_innermost_function() {
        let script = "\
\tffffffff81 htab_map_hash+0x10 ([kernel.kallsyms])
\tffffffffa0 bpf_prog_abc_lb+0x200 (bpf_prog_abc_lb)
\tffffffff82 bpf_test_run+0x99 ([kernel.kallsyms])

\tffffffffa0 bpf_prog_abc_lb+0x10 (bpf_prog_abc_lb)
\tffffffff82 bpf_test_run+0x99 ([kernel.kallsyms])

\tffffffffa0 bpf_prog_abc_lb+0x30 (bpf_prog_abc_lb)
\tffffffff82 bpf_test_run+0x99 ([kernel.kallsyms])

\tffffffff83 pv_native_safe_halt+0x1 ([kernel.kallsyms])
\tffffffff84 default_idle+0x5 ([kernel.kallsyms])
";
        let (total, by_fn) = samples_in_test_run(script);
        assert_eq!(total, 3);
        assert_eq!(
            by_fn,
            vec![
                ("bpf_prog_abc_lb".to_string(), 2),
                ("htab_map_hash".to_string(), 1)
            ]
        );
    }
}
