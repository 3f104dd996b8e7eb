//! Check that serial logs hold the test guest's `console` stream exactly
//! once (`staunch_guestproto::console::check`):
//!
//! ```text
//! cargo run -p staunch-testguest --example console_check -- serial.log...
//! ```
//!
//! Prints one line per log and exits 1 if any lost or gained a byte.

fn main() {
    let mut bad = false;
    for path in std::env::args().skip(1) {
        let log = match std::fs::read(&path) {
            Ok(l) => l,
            Err(e) => {
                eprintln!("{path}: {e}");
                std::process::exit(2);
            }
        };
        let c = staunch_testguest::proto::console::check(&log);
        println!(
            "{path}: lines={} ended={} lost={} doubled={} extra={} first_bad={}",
            c.lines,
            c.ended,
            c.lost,
            c.doubled,
            c.extra,
            c.first_bad.map_or("-".to_string(), |o| o.to_string())
        );
        for d in c.deviations.iter().take(20) {
            let at = d.offset.min(log.len());
            let ctx = String::from_utf8_lossy(&log[at.saturating_sub(40)..(at + 40).min(log.len())]).into_owned();
            println!("  at {}: {:?} {} bytes near {ctx:?}", d.offset, d.kind, d.bytes);
        }
        bad |= !c.clean();
    }
    std::process::exit(bad as i32);
}
