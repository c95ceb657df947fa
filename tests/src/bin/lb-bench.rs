//! `cargo xtask bench`: runs the benchmarks, prints the table and writes target/bench/results.json.
fn main() {
    let opts = if std::env::args().any(|a| a == "--smoke") {
        lb_tests::bench::Options::smoke()
    } else {
        lb_tests::bench::Options::full()
    };
    let v = lb_tests::bench::run(&opts);
    print!("{}", lb_tests::bench::table(&v));
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/bench");
    std::fs::create_dir_all(&dir).expect("creating target/bench");
    let path = dir.join("results.json");
    std::fs::write(&path, serde_json::to_string_pretty(&v).unwrap()).expect("writing results.json");
    println!("wrote {}", path.display());
}
