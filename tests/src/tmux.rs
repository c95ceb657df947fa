//! A command in a pseudo-terminal: a tmux server of the test's own (its own socket), one
//! session of a fixed size, whose screen is read with `capture-pane` and which is sent keys.
//! The command runs under `sh`, which writes its exit status to a file: tmux may leave an
//! exited pane process unreaped (a zombie, its status unknown to tmux) for a long while. The
//! pane stays after its command exits. The server is killed, and the file removed, on drop.

use std::{
    path::PathBuf,
    process::{Command, Output},
    sync::atomic::{AtomicU32, Ordering},
    time::{Duration, Instant},
};

static NEXT: AtomicU32 = AtomicU32::new(0);

pub struct Tmux {
    socket: String,
    status: PathBuf,
    /// The server's socket file, which kill-server leaves behind.
    socket_path: Option<PathBuf>,
}

impl Tmux {
    /// Starts `argv` in a `width` x `height` terminal.
    pub fn start(argv: &[&str], width: u16, height: u16) -> Self {
        let socket = format!(
            "lbt-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        let status = std::env::temp_dir().join(format!("{socket}.status"));
        let mut t = Self {
            socket,
            status,
            socket_path: None,
        };
        let script = format!(
            "\"$@\"; echo $? > {0}.tmp && mv {0}.tmp {0}",
            t.status.display()
        );
        // One tmux invocation, so that remain-on-exit is set before the command can end.
        let (w, h) = (width.to_string(), height.to_string());
        let mut args = vec!["new-session", "-d", "-s", "t", "-x", &w, "-y", &h];
        args.extend(["sh", "-c", &script, "sh"]);
        args.extend(argv);
        args.extend([";", "set-option", "-t", "t", "remain-on-exit", "on"]);
        t.ok(&args);
        let path = t.ok(&["display-message", "-p", "#{socket_path}"]);
        t.socket_path = Some(PathBuf::from(path.trim()));
        t
    }

    fn run(&self, args: &[&str]) -> Output {
        Command::new("tmux")
            .arg("-L")
            .arg(&self.socket)
            .args(args)
            .env_remove("TMUX")
            .output()
            .expect("running tmux (cargo xtask setup installs it)")
    }

    fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(
            out.status.success(),
            "tmux {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// The screen's text now.
    pub fn screen(&self) -> String {
        self.ok(&["capture-pane", "-p", "-t", "t"])
    }

    /// Sends keys (tmux key names: `q`, `Escape`, `C-c`).
    pub fn keys(&self, keys: &str) {
        self.ok(&["send-keys", "-t", "t", keys]);
    }

    /// The command's exit status, once it has exited.
    pub fn exit_status(&self) -> Option<i32> {
        std::fs::read_to_string(&self.status)
            .ok()
            .and_then(|s| s.trim().parse().ok())
    }

    /// The pane's process: pid and command (for failure messages).
    pub fn pane(&self) -> String {
        self.ok(&[
            "display-message",
            "-p",
            "-t",
            "t",
            "pid #{pane_pid}, command #{pane_current_command}",
        ])
    }

    /// Polls the screen until `ok` accepts it; panics with the last screen after `timeout`.
    pub fn wait_screen(&self, timeout: Duration, what: &str, ok: impl Fn(&str) -> bool) -> String {
        let start = Instant::now();
        loop {
            let s = self.screen();
            if ok(&s) {
                return s;
            }
            assert!(
                start.elapsed() < timeout,
                "the screen did not show {what} within {timeout:?}; it shows:\n{s}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = self.run(&["kill-server"]);
        let _ = std::fs::remove_file(&self.status);
        if let Some(p) = &self.socket_path {
            let _ = std::fs::remove_file(p);
        }
    }
}
