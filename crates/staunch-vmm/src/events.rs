//! The VMM's structured events (the shared format of every component).

use serde_json::json;
pub use staunch_events::emit;
use std::path::PathBuf;
use std::sync::OnceLock;

static FIRED_TO: OnceLock<Option<PathBuf>> = OnceLock::new();

/// Report every failpoint that fires as a `failpoint-fired` event, written
/// before the action runs: a campaign then tells an injected fault that
/// fired from one that was armed and never hit. The first VM of the process
/// decides where the events go.
pub fn report_failpoints(events: Option<PathBuf>) {
    if FIRED_TO.set(events).is_ok() {
        staunch_fault::on_fired(|p, a| {
            let to = FIRED_TO.get().and_then(|p| p.as_deref());
            emit(to, "failpoint-fired", json!({"point": p.name, "action": a.name(), "count": p.fired()}));
        });
    }
}
