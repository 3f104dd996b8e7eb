//! The host's check of the guest's console: `blk-verify`'s reports are a
//! known byte stream (one exact shape per line, `written=` growing by the
//! report interval), so a byte lost or doubled anywhere breaks a line's
//! shape or its number.

/// Lines of `log` that are not exactly what the guest printed, with why.
/// `every` is the guest's report interval (`staunch.report`). Only complete
/// lines are judged (the log may end mid-line while the guest prints).
pub fn blk_report_errors(log: &str, every: u64) -> Vec<String> {
    let mut bad = Vec::new();
    let mut last: Option<u64> = None;
    let complete = &log[..log.rfind('\n').map_or(0, |i| i + 1)];
    for l in complete.lines() {
        let Some(rest) = l.strip_prefix(crate::proto::LINE_PREFIX) else {
            bad.push(format!("no prefix: {l:?}"));
            continue;
        };
        let Some(kv) = rest.strip_prefix("blk written=") else {
            // Lines of other shapes the guest prints; what they report is
            // judged elsewhere (mismatches, errors).
            let known = [
                "ready ",
                "blk capacity=",
                "blk id=",
                "blk qd=",
                "blk mismatch ",
                "blk flush ",
                "cpu mismatch ",
                "done code=",
            ];
            if !known.iter().any(|k| rest.starts_with(k)) {
                bad.push(format!("unknown line: {l:?}"));
            }
            continue;
        };
        let mut fields = kv.split(' ');
        let written = fields.next().and_then(number);
        // Every further field is key=number, and the three counters come first.
        let rest: Vec<&str> = fields.collect();
        let counters = ["verified", "mismatches", "errors"];
        let shaped = rest.len() >= 3
            && rest.iter().enumerate().all(|(i, f)| {
                f.split_once('=').is_some_and(|(k, v)| {
                    !k.is_empty() && number(v).is_some() && counters.get(i).is_none_or(|c| *c == k)
                })
            });
        let Some(w) = written.filter(|_| shaped) else {
            bad.push(format!("malformed: {l:?}"));
            continue;
        };
        // The final report repeats the count of the last regular one when the
        // run ends on a report boundary.
        let last_line = rest.contains(&"final=1");
        match last {
            Some(p) if w != p + every && !(last_line && w >= p && w < p + every) => {
                bad.push(format!("written={w} after {p}: {l:?}"))
            }
            _ => {}
        }
        last = Some(w);
    }
    bad
}

/// A number as the guest prints it (no sign, no leading zero), so a doubled
/// `0` is seen too.
fn number(v: &str) -> Option<u64> {
    v.parse::<u64>().ok().filter(|n| n.to_string() == v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lost_and_a_doubled_byte_are_seen() {
        let good = "STAUNCH blk written=100 verified=100 mismatches=0 errors=0 maxgap_us=12\n\
                    STAUNCH blk written=200 verified=200 mismatches=0 errors=0 maxgap_us=9\n";
        assert!(blk_report_errors(good, 100).is_empty());
        let lost = good.replacen("STAUNCH blk written=2", "TAUNCH blk written=2", 1);
        assert_eq!(blk_report_errors(&lost, 100).len(), 1);
        assert_eq!(blk_report_errors(&good.replacen("written=200", "written=2000", 1), 100).len(), 1);
        assert_eq!(blk_report_errors(&good.replacen("errors=0 ", "errors=00 ", 1), 100).len(), 1);
        assert_eq!(blk_report_errors(&good.replacen("errors=0 ", "erors=0 ", 1), 100).len(), 1);
        assert_eq!(blk_report_errors(&good.replacen("\n", "\n\n", 1), 100).len(), 1);
        let fin =
            format!("{good}STAUNCH blk written=200 verified=200 mismatches=0 errors=0 final=1\nSTAUNCH done code=0\n");
        assert!(blk_report_errors(&fin, 100).is_empty(), "{:?}", blk_report_errors(&fin, 100));
        assert_eq!(blk_report_errors(&good.replacen("  ", " ", 1).replacen(" v", "  v", 1), 100).len(), 1);
    }
}
