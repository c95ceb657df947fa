//! `lb completions SHELL` and `lb man`: what clap generates, checked by the tools that read it
//! (bash itself, groff). The subcommands each must cover are read off `lb --help`, not from the
//! code that generates them.

use std::process::Command;

fn lb(args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_lb-under-test"))
        .args(args)
        .output()
        .expect("running lb");
    assert!(
        out.status.success(),
        "lb {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("UTF-8 output")
}

/// The subcommands `lb --help` lists (its "Commands:" section), `help` left out.
fn subcommands() -> Vec<String> {
    let help = lb(&["--help"]);
    let list: Vec<String> = help
        .lines()
        .skip_while(|l| !l.starts_with("Commands:"))
        .skip(1)
        .take_while(|l| l.starts_with("  "))
        .filter_map(|l| l.split_whitespace().next().map(str::to_string))
        .filter(|c| c != "help")
        .collect();
    assert!(list.len() >= 10, "too few subcommands in --help: {list:?}");
    list
}

/// Runs `script` in `bash` with stdin `input`; returns (success, stdout, stderr).
fn bash(script: &str, input: &str) -> (bool, String, String) {
    let p = lb_tests::pipe(Command::new("bash").args(["-c", script]), input);
    (p.ok, p.stdout, p.stderr)
}

#[test]
fn the_bash_completion_parses_and_completes_every_subcommand_from_its_first_letters() {
    let script = lb(&["completions", "bash"]);
    let (ok, _, err) = bash("bash -n /dev/stdin", &script);
    assert!(ok, "bash -n: {err}");
    // Loaded into a shell and asked as bash asks it (COMP_WORDS, COMP_CWORD): each subcommand's
    // first three letters complete to a list that holds it.
    for sub in subcommands() {
        let prefix = &sub[..sub.len().min(3)];
        let ask = format!(
            "source /dev/stdin; COMP_WORDS=(lb {prefix}); COMP_CWORD=1; COMP_LINE='lb {prefix}'; \
             COMP_POINT=${{#COMP_LINE}}; _lb lb {prefix} lb; printf '%s\\n' \"${{COMPREPLY[@]}}\""
        );
        let (ok, said, err) = bash(&ask, &script);
        assert!(ok, "completing {prefix:?}: {err}");
        assert!(
            said.lines().any(|w| w == sub),
            "`lb {prefix}<TAB>` offers {said:?}, not {sub}"
        );
    }
}

#[test]
fn the_zsh_and_fish_completions_name_every_subcommand() {
    // Neither shell is on this machine to parse them: their text must at least name each one.
    for shell in ["zsh", "fish"] {
        let script = lb(&["completions", shell]);
        for sub in subcommands() {
            assert!(script.contains(&sub), "{shell}: no {sub}");
        }
    }
}

#[test]
fn the_man_page_renders_without_groff_warnings_and_lists_every_subcommand() {
    let page = lb(&["man"]);
    // -ww: every warning; -z: no output, only the diagnostics.
    let (ok, _, warnings) = bash("groff -man -Tutf8 -ww -z", &page);
    assert!(ok && warnings.is_empty(), "groff: {warnings}");
    let (ok, text, err) = bash("groff -man -Tascii -P-cbou", &page);
    assert!(ok, "groff: {err}");
    assert!(
        text.contains("SYNOPSIS") && text.contains("--pin-dir"),
        "{text}"
    );
    for sub in subcommands() {
        assert!(
            text.contains(&sub),
            "the man page does not list {sub}:\n{text}"
        );
    }
}
