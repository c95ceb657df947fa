//! The `lb` binary, built inside this package so its tests can run (and kill) the real agent.
fn main() -> std::process::ExitCode {
    lb_userspace::cli::main()
}
