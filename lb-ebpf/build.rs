//! Rebuild when bpf-linker changes: it is an undeclared dependency of the BPF build. And let
//! LLVM use the whole BPF stack.
fn main() {
    if let Ok(path) = std::env::var("PATH") {
        for dir in std::env::split_paths(&path) {
            let linker = dir.join("bpf-linker");
            if linker.exists() {
                println!("cargo:rerun-if-changed={}", linker.display());
                break;
            }
        }
    }
    // The kernel gives a BPF program 512 bytes of stack, r10-512 to r10-1 (MAX_BPF_STACK), but
    // LLVM's BPF backend refuses an object at r10-512 ("stack limit exceeded" for an offset of
    // -512 or below): its limit is set one 8-byte slot further, so that `lb` may use the
    // last slot the kernel allows (it needs it since the new-flow budget). Nothing past it
    // compiles, and the verifier checks every access when the program loads.
    // Only for the BPF target: bpf-linker takes the argument, a host linker (the crate's own
    // host build, under `cargo test --workspace`) does not.
    if std::env::var("CARGO_CFG_TARGET_ARCH").as_deref() == Ok("bpf") {
        println!("cargo:rustc-link-arg-bins=--llvm-args=-bpf-stack-size=520");
    }
}
