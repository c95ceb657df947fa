//! Test support for lb: a packet builder, network namespaces that clean up after themselves, and a
//! harness that loads the XDP program and runs frames through it with `BPF_PROG_TEST_RUN`.
//!
//! The tests need root (CAP_BPF, CAP_NET_ADMIN, CAP_SYS_ADMIN for namespaces); [`require_root`]
//! fails them with a message saying so rather than letting them pass without running.

pub mod agent;
pub mod bench;
pub mod bench_peer;
pub mod cluster;
pub mod config;
pub mod dc;
pub mod ecmp;
pub mod harness;
pub mod helm;
pub mod kubeapi;
pub mod lab;
pub mod memcg;
pub mod netns;
pub mod packet;
pub mod promql;
pub mod raw;
pub mod release;
pub mod scrape;
pub mod tmux;
pub mod upgrade;
pub mod veth_lab;
pub mod wellformed;

/// The YAML documents of `deploy/<file>`, as JSON values.
pub fn deploy_docs(file: &str) -> Vec<serde_json::Value> {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../deploy")
        .join(file);
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    serde_saphyr::from_multiple(&text).unwrap_or_else(|e| panic!("deploy/{file}: {e}"))
}

/// Fails the calling test, with the reason, unless it runs as root.
pub fn require_root() {
    let euid = unsafe { libc::geteuid() };
    assert_eq!(
        euid, 0,
        "this test loads an XDP program and creates network namespaces: it needs root \
         (run it through `cargo xtask test`, which CI runs as root)"
    );
}

/// Formats a frame as hex, 16 bytes a line (the first 160 bytes), for assertion messages.
pub fn hex(bytes: &[u8]) -> String {
    let shown = &bytes[..bytes.len().min(160)];
    let more = if bytes.len() > shown.len() {
        format!("\n... {} bytes in all", bytes.len())
    } else {
        String::new()
    };
    hex_all(shown) + &more
}

/// All of `bytes` as hex, 16 a line (failure messages: a full-size frame's fault may lie past
/// the first lines).
pub fn hex_all(bytes: &[u8]) -> String {
    bytes
        .chunks(16)
        .enumerate()
        .map(|(i, c)| {
            let h: Vec<String> = c.iter().map(|b| format!("{b:02x}")).collect();
            format!("{:04x}: {}", i * 16, h.join(" "))
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// What a command made of what it was given on stdin.
pub struct Piped {
    pub ok: bool,
    pub stdout: String,
    pub stderr: String,
}

/// Runs `cmd` with `input` on its stdin and waits for it. A command that cannot start is a
/// missing tool: the panic says that `cargo xtask setup` installs it.
pub fn pipe(cmd: &mut std::process::Command, input: &str) -> Piped {
    use std::{io::Write as _, process::Stdio};
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("starting {cmd:?} ({e}): `cargo xtask setup` installs it"));
    child
        .stdin
        .take()
        .unwrap()
        .write_all(input.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    Piped {
        ok: out.status.success(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// Every file under `dir` (recursively) whose name ends in `.{ext}`, sorted.
pub fn files_under(dir: &std::path::Path, ext: &str) -> Vec<std::path::PathBuf> {
    fn walk(dir: &std::path::Path, ext: &str, out: &mut Vec<std::path::PathBuf>) {
        let entries = std::fs::read_dir(dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
        for entry in entries {
            let path = entry.expect("a directory entry").path();
            if path.is_dir() {
                walk(&path, ext, out);
            } else if path.extension().is_some_and(|e| e == ext) {
                out.push(path);
            }
        }
    }
    let mut out = Vec::new();
    walk(dir, ext, &mut out);
    out.sort();
    out
}
