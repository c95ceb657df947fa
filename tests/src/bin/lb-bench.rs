//! `cargo xtask bench`: runs the benchmarks, prints the table and writes target/bench/results.json
//! (`--only forwarding,memory` runs those sections only and writes results-<sections>.json).
fn main() {
    let args: Vec<String> = std::env::args().collect();
    let opts = if args.iter().any(|a| a == "--smoke") {
        lb_tests::bench::Options::smoke()
    } else {
        lb_tests::bench::Options::full()
    };
    let only = args.iter().position(|a| a == "--only").map(|i| {
        args.get(i + 1)
            .expect("--only needs a list of sections")
            .clone()
    });
    let sections: Vec<&str> = match &only {
        Some(list) => list.split(',').collect(),
        None => lb_tests::bench::SECTIONS.to_vec(),
    };
    if let Some(bad) = sections
        .iter()
        .find(|s| !lb_tests::bench::SECTIONS.contains(s))
    {
        eprintln!(
            "lb-bench: --only: no section {bad:?} (sections: {})",
            lb_tests::bench::SECTIONS.join(", ")
        );
        std::process::exit(2);
    }
    let v = lb_tests::bench::run_only(&opts, &sections);
    print!("{}", lb_tests::bench::table(&v));
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/bench");
    std::fs::create_dir_all(&dir).expect("creating target/bench");
    let path = match &only {
        Some(list) => dir.join(format!("results-{}.json", list.replace(',', "-"))),
        None => dir.join("results.json"),
    };
    std::fs::write(&path, serde_json::to_string_pretty(&v).unwrap()).expect("writing results.json");
    println!("wrote {}", path.display());
}
