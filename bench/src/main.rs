//! `modehub-bench`: the benchmark harness of docs/BENCHMARKS.md (not shipped, not a test).
//!
//! ```text
//! modehub-bench [compare] [OPTIONS]        # the comparison; benches/compare.sh runs it
//! modehub-bench rumqttd-alone ADDR USER:PASS...   # ceiling: rumqttd as the hub configures it
//! modehub-bench outbox-alone DIR [..]      # ceiling: the outbox append path alone
//! ```
//! The two ceilings are modes of the same binary (one release link instead of three) that
//! `compare` starts as separate processes, so their CPU, RSS and disk writes are their own.
//! It reports figures and asserts none of them: timing goals live here, never in tests.

mod compare;
mod outbox_alone;
mod rumqttd_alone;

fn main() -> anyhow::Result<()> {
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("rumqttd-alone") => {
            args.remove(0);
            rumqttd_alone::main(args);
            Ok(())
        }
        Some("outbox-alone") => {
            args.remove(0);
            outbox_alone::main(args)
        }
        Some("compare") => {
            args.remove(0);
            compare::main(args)
        }
        _ => compare::main(args),
    }
}
