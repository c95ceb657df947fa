//! The previous release's agent, built from the commit `release/previous` names, so upgrade and
//! rollback tests run the real binary an operator would be upgrading from.
//!
//! The source is a git worktree at `target/previous/src` (detached at that commit); the binary is
//! kept at `target/previous/lb` with a stamp naming the commit, so a warm machine builds it once.
//! `cargo xtask test` builds it before the tests, into the workspace's target dir (sharing its
//! dependencies); tests run without xtask build it here, into `target/previous/target` (cargo
//! holds the workspace's target dir while tests run). A file lock serialises builds between test
//! processes.

use std::{
    fs::File,
    path::{Path, PathBuf},
    process::Command,
    sync::OnceLock,
};

use nix::fcntl::{Flock, FlockArg};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the workspace root")
        .to_path_buf()
}

/// The commit of the previous release (the first line of `release/previous`).
pub fn previous_commit() -> String {
    let path = root().join("release/previous");
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    let commit = text.lines().next().unwrap_or_default().trim().to_string();
    assert!(
        commit.len() == 40 && commit.chars().all(|c| c.is_ascii_hexdigit()),
        "{} must name a full commit hash, not {commit:?}",
        path.display()
    );
    commit
}

/// The previous release's version: the workspace's, in `Cargo.toml` at [`previous_commit`].
pub fn previous_version() -> String {
    let commit = previous_commit();
    let out = Command::new("git")
        .current_dir(root())
        .args(["show", &format!("{commit}:Cargo.toml")])
        .output()
        .expect("running git show");
    assert!(
        out.status.success(),
        "git show {commit}:Cargo.toml (is the clone shallow? it needs that commit): {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).expect("Cargo.toml is UTF-8");
    let workspace = text
        .split("[workspace.package]")
        .nth(1)
        .expect("the previous release's Cargo.toml has [workspace.package]");
    workspace
        .lines()
        .find_map(|l| {
            let v = l.strip_prefix("version")?.trim_start().strip_prefix('=')?;
            Some(v.trim().trim_matches('"').to_string())
        })
        .expect("the previous release's [workspace.package] has a version")
}

/// The previous release's `lb` binary, built on first use (a few minutes from cold; then cached).
pub fn previous_bin() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(build_previous).clone()
}

fn run(cmd: &mut Command, what: &str) {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("{what}: cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{what} failed ({}):\n{}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn build_previous() -> PathBuf {
    let commit = previous_commit();
    let base = root().join("target/previous");
    std::fs::create_dir_all(&base).expect("creating target/previous");
    let lock_file = File::create(base.join("lock")).expect("creating target/previous/lock");
    let _lock = Flock::lock(lock_file, FlockArg::LockExclusive)
        .map_err(|(_, e)| e)
        .expect("locking target/previous");
    let src = base.join("src");
    let target = base.join("target");
    let bin = base.join("lb");
    let stamp = base.join("built");
    if bin.exists() && std::fs::read_to_string(&stamp).ok().as_deref() == Some(commit.as_str()) {
        return bin;
    }
    let git = |args: &[&str]| {
        let mut c = Command::new("git");
        c.current_dir(root()).args(args);
        c
    };
    if src.join(".git").exists() {
        run(
            Command::new("git")
                .current_dir(&src)
                .args(["checkout", "--quiet", "--detach", &commit]),
            "checking out the previous release",
        );
    } else {
        // A stale registration (the folder was removed by hand) would refuse the add.
        run(&mut git(&["worktree", "prune"]), "git worktree prune");
        run(
            &mut git(&[
                "worktree",
                "add",
                "--force",
                "--detach",
                src.to_str().unwrap(),
                &commit,
            ]),
            "adding the previous release's worktree (is the clone shallow? it needs that commit)",
        );
    }
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    eprintln!(
        "building the previous release ({commit}) into {}",
        target.display()
    );
    run(
        Command::new(cargo)
            .current_dir(&src)
            .env("CARGO_TARGET_DIR", &target)
            .args([
                "build",
                "--quiet",
                "--package",
                "lb-userspace",
                "--bin",
                "lb",
            ]),
        "building the previous release",
    );
    std::fs::copy(target.join("debug/lb"), &bin).expect("copying the previous agent");
    std::fs::write(&stamp, &commit).expect("writing the build stamp");
    bin
}
