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
        /// Run only these sections, comma-separated: fastpath, forwarding, maglev,
        /// control_plane, memory, programs (writes target/bench/results-<sections>.json).
        #[arg(long, value_name = "SECTIONS")]
        only: Option<String>,
    },
}

fn main() -> Result<()> {
    match Cli::parse().command {
        Cmd::Setup { build_only } => setup(build_only),
        Cmd::Test { no_lint, args } => {
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
            run(cargo().args(["test", "--workspace"]).arg("--").args(&args))
        }
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
        Cmd::Demo => {
            setup(false)?;
            require_root("the demo attaches XDP programs inside network namespaces")?;
            // The demo runs the real agent binary, built like any user would build it.
            run(&mut cargo_release("build", "lb-userspace", "lb"))?;
            run(cargo_release("run", "lb-tests", "lb-demo")
                .env("LB_BIN", workspace_root().join("target/release/lb")))
        }
    }
}

/// Tools the tests use: `ip`, `ethtool`, `capsh` (the DaemonSet's capability set is proven
/// under it), Python's venv (for kubernetes-validate) and BIRD 2 (the scale-out lab's routing
/// daemon; the tests start their own, in namespaces).
const TEST_APT_PACKAGES: &[&str] = &[
    "iproute2",
    "ethtool",
    "libcap2-bin",
    "python3-venv",
    "bird2",
];
/// The manifest validator the tests run, from PyPI, in a virtualenv under target/.
const KUBERNETES_VALIDATE: &str = "kubernetes-validate==1.37.0";

/// Where `cargo xtask setup` puts kubernetes-validate.
fn tools_venv() -> PathBuf {
    workspace_root().join("target/tools/venv")
}

const APT_PACKAGES: &[&str] = &[
    "llvm-22-dev",
    "libpolly-22-dev",
    "libzstd-dev",
    "zlib1g-dev",
];
const BPF_LINKER_VERSION: &str = "0.13.0";
const LLVM_PREFIX: &str = "/usr/lib/llvm-22";

/// Installs only what is missing, saying what it checked and what it did.
fn setup(build_only: bool) -> Result<()> {
    // The eBPF crate is built by nightly with -Z build-std=core, which needs nightly's rust-src.
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
    } else {
        say("nightly rust-src: missing, installing");
        run(Command::new("rustup").args([
            "component",
            "add",
            "rust-src",
            "--toolchain",
            "nightly",
        ]))?;
    }

    let wanted: &[&str] = if build_only { &[] } else { TEST_APT_PACKAGES };
    let missing: Vec<&str> = APT_PACKAGES
        .iter()
        .chain(wanted)
        .copied()
        .filter(|p| !dpkg_installed(p))
        .collect();
    if missing.is_empty() {
        let all: Vec<&str> = APT_PACKAGES.iter().chain(wanted).copied().collect();
        say(&format!("Debian packages ({}): present", all.join(", ")));
    } else {
        say(&format!(
            "Debian packages missing: {}; installing",
            missing.join(", ")
        ));
        require_root("installing Debian packages")?;
        run(Command::new("apt-get").arg("update").arg("-q"))?;
        run(Command::new("apt-get")
            .args(["install", "-y", "-q"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive"))?;
    }

    match output(Command::new("bpf-linker").arg("--version")) {
        Ok(v) => say(&format!("bpf-linker: present ({})", v.trim())),
        Err(_) => {
            say(&format!(
                "bpf-linker: missing, building {BPF_LINKER_VERSION} against LLVM 22 (takes a few minutes)"
            ));
            run(cargo()
                .args([
                    "install",
                    "bpf-linker",
                    "--version",
                    BPF_LINKER_VERSION,
                    "--no-default-features",
                    "--features",
                    "llvm-22",
                ])
                .env("LLVM_PREFIX", LLVM_PREFIX))?;
        }
    }

    if build_only {
        return Ok(());
    }

    let validator = tools_venv().join("bin/kubernetes-validate");
    match output(Command::new(&validator).arg("--version")) {
        Ok(v) => say(&format!("kubernetes-validate: present ({})", v.trim())),
        Err(_) => {
            say(&format!(
                "kubernetes-validate: missing, installing {KUBERNETES_VALIDATE} into {}",
                tools_venv().display()
            ));
            run(Command::new("python3")
                .args(["-m", "venv"])
                .arg(tools_venv()))?;
            run(Command::new(tools_venv().join("bin/pip")).args([
                "install",
                "--quiet",
                KUBERNETES_VALIDATE,
            ]))?;
        }
    }

    let bpffs = Path::new("/sys/fs/bpf");
    if is_bpffs_mounted(bpffs)? {
        say("bpffs: mounted at /sys/fs/bpf");
    } else if is_root() {
        say("bpffs: not mounted, mounting at /sys/fs/bpf");
        run(Command::new("mount").args(["-t", "bpf", "bpf"]).arg(bpffs))?;
    } else {
        say("bpffs: not mounted (run setup as root to mount it; pinning needs it)");
    }
    Ok(())
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
