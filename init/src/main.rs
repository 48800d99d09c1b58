//! `hakim-init`: PID 1 of Hakim workspaces. See the crate docs and README.

fn main() {
    let args: Vec<String> = std::env::args().collect();
    // Internal mode: the blocking agent download runs in a child, never in PID 1.
    if args.get(1).map(String::as_str) == Some("__fetch-agent") {
        std::process::exit(hakim_init::fetch::run_fetch_child(&args[2..]));
    }
    std::process::exit(hakim_init::boot::run(&args[1..]));
}
