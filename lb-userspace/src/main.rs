use anyhow::Context as _;

fn main() -> anyhow::Result<()> {
    let ebpf = lb_userspace::program::load(&Default::default(), None)
        .context("loading the XDP program (are you root?)")?;
    println!(
        "loaded; maps: {:?}",
        ebpf.maps().map(|(n, _)| n).collect::<Vec<_>>()
    );
    Ok(())
}
