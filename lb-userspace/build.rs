//! Builds the XDP program (`lb-ebpf`) for the BPF target and puts the object in `OUT_DIR`, so that
//! `cargo build` alone gives an `lb` binary with the program embedded.
//!
//! The BPF build does not depend on the host profile (aya-build always builds it `--release`), so
//! it goes to one place per target dir, `<target>/ebpf`, shared by the debug, release and clippy
//! builds: `cargo xtask demo`, `cargo xtask test` and `cargo xtask bench` build it once between
//! them. (aya-build puts its cargo target dir under `OUT_DIR`, which differs per profile; this
//! script points it at the shared dir and copies the object back.)
//!
//! With `AYA_BUILD_SKIP=1` nothing is built and the embedded object is empty: enough for the
//! pure unit tests and for lints, and `program::load` then refuses with a message saying so.
use std::path::{Path, PathBuf};

use anyhow::{Context as _, anyhow};
use aya_build::Toolchain;

/// The object's name in `OUT_DIR` (the lb-ebpf binary's name).
const OBJECT: &str = "lb";

fn main() -> anyhow::Result<()> {
    let out_dir = PathBuf::from(std::env::var_os("OUT_DIR").context("OUT_DIR not set")?);
    let skip =
        std::env::var("AYA_BUILD_SKIP").is_ok_and(|v| v == "1" || v.eq_ignore_ascii_case("true"));
    let shared = shared_dir(&out_dir);
    std::fs::create_dir_all(&shared).with_context(|| format!("creating {}", shared.display()))?;
    // aya-build reads OUT_DIR for where to build and where to put the object. The build
    // script is single-threaded here: nothing else reads the environment meanwhile.
    unsafe { std::env::set_var("OUT_DIR", &shared) };
    build()?;
    let dst = out_dir.join(OBJECT);
    match skip {
        true => std::fs::write(&dst, b"").with_context(|| format!("writing {}", dst.display()))?,
        false => {
            let src = shared.join(OBJECT);
            std::fs::copy(&src, &dst)
                .with_context(|| format!("copying {} to {}", src.display(), dst.display()))?;
        }
    }
    Ok(())
}

fn build() -> anyhow::Result<()> {
    let cargo_metadata::Metadata { packages, .. } = cargo_metadata::MetadataCommand::new()
        .no_deps()
        .exec()
        .context("reading the workspace metadata")?;
    let ebpf = packages
        .into_iter()
        .find(|p| p.name.as_str() == "lb-ebpf")
        .ok_or_else(|| anyhow!("the lb-ebpf package is not in the workspace"))?;
    let root_dir = ebpf
        .manifest_path
        .parent()
        .ok_or_else(|| anyhow!("{} has no parent directory", ebpf.manifest_path))?;
    aya_build::build_ebpf(
        [aya_build::Package {
            name: ebpf.name.as_str(),
            root_dir: root_dir.as_str(),
            ..Default::default()
        }],
        Toolchain::default(),
    )
    .context("building lb-ebpf (needs `cargo xtask setup`: nightly rust-src and bpf-linker)")
}

/// `<target>/ebpf`: the target dir is the nearest ancestor of `OUT_DIR` that cargo tagged with
/// `CACHEDIR.TAG`; without one (an unusual layout), `OUT_DIR` itself.
fn shared_dir(out_dir: &Path) -> PathBuf {
    out_dir
        .ancestors()
        .find(|d| d.join("CACHEDIR.TAG").is_file())
        .map(|t| t.join("ebpf"))
        .unwrap_or_else(|| out_dir.to_path_buf())
}
