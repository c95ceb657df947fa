//! `lb`: the load balancer's command line.
use anyhow::Context as _;
use clap::{Parser, Subcommand};
use lb_common::maps;
use lb_userspace::program::{self, Sizes};

#[derive(Parser)]
#[command(name = "lb", version, about = "An XDP layer-4 load balancer")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Load and verify the XDP program with the given sizes, without attaching it, and report
    /// the maps it would create. Tells whether this kernel can run lb. Needs root.
    Check {
        /// Maglev table size M per VIP (prime).
        #[arg(long, default_value_t = maps::DEFAULT_MAGLEV_M)]
        table_size: u32,
        #[arg(long, default_value_t = maps::DEFAULT_MAX_VIPS)]
        max_vips: u32,
        #[arg(long, default_value_t = maps::DEFAULT_MAX_BACKENDS)]
        max_backends: u32,
        /// Entries in the LRU flow table.
        #[arg(long, default_value_t = maps::DEFAULT_FLOW_ENTRIES)]
        flow_entries: u32,
    },
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Check {
            table_size,
            max_vips,
            max_backends,
            flow_entries,
        } => {
            let sizes = Sizes {
                maglev_m: table_size,
                max_vips,
                max_backends,
                flow_entries,
                ..Default::default()
            };
            let ebpf = program::load(&sizes, None).context("loading the lb XDP program")?;
            println!("the XDP program loads and verifies on this kernel; its maps:");
            let mut names: Vec<_> = ebpf.maps().map(|(n, _)| n.to_string()).collect();
            names.sort();
            for n in names {
                println!("  {n}");
            }
            Ok(())
        }
    }
}
