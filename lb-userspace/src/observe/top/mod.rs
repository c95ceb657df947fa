//! `lb top`: a live view of a running agent in the terminal. Per VIP its packets, new flows and
//! drops per second; per backend its share of the VIP's new flows next to its share of the
//! weights, its health, and the flows still pinned to it while it drains.
//!
//! Readings ([`sample`]) -> a screen's figures ([`model`], pure) -> lines ([`ui`]), drawn in
//! the alternate screen ([`live`]) or printed once as plain text ([`once`]).

pub mod live;
pub mod model;
pub mod sample;
pub mod ui;

use std::{path::Path, time::Duration};

use crate::{
    kernel::inspect::{InspectError, Pinned},
    status::file::read_status,
};

#[derive(Debug, thiserror::Error)]
pub enum TopError {
    #[error(transparent)]
    Inspect(#[from] InspectError),
    #[error("drawing on the terminal")]
    Terminal(#[source] std::io::Error),
    #[error("the live view needs a terminal: `lb top --once` prints one screen as text")]
    NotATerminal,
}

/// Reads the maps and the status file (read afresh each time: weights and health change).
fn read(p: &Pinned, state_dir: &Path) -> Result<sample::Sample, InspectError> {
    sample::read(p, read_status(state_dir).as_ref())
}

/// `lb top --once`: two readings `interval` apart, one screen ([`ui::to_text`] prints it).
pub fn once(p: &Pinned, state_dir: &Path, interval: Duration) -> Result<model::Frame, TopError> {
    let first = read(p, state_dir)?;
    std::thread::sleep(interval);
    let cur = read(p, state_dir)?;
    Ok(model::build(&first, &first, &cur))
}

pub use live::live;

/// `--interval`: seconds (`0.5`) or a duration (`500ms`), at least 100 ms.
pub fn parse_interval(s: &str) -> Result<Duration, String> {
    let d = match s.parse::<f64>() {
        Ok(secs) if secs.is_finite() && secs >= 0.0 => Duration::from_secs_f64(secs),
        Ok(_) => return Err(format!("{s} is not a number of seconds")),
        Err(_) => humantime::parse_duration(s).map_err(|e| format!("{s}: {e}"))?,
    };
    if d < Duration::from_millis(100) {
        return Err(format!("{s} is shorter than the shortest interval, 100ms"));
    }
    Ok(d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_interval_is_seconds_or_a_duration_of_at_least_100ms() {
        assert_eq!(parse_interval("0.5"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_interval("2s"), Ok(Duration::from_secs(2)));
        assert_eq!(parse_interval("250ms"), Ok(Duration::from_millis(250)));
        assert!(parse_interval("10ms").unwrap_err().contains("shortest"));
        assert!(parse_interval("-1").is_err());
        assert!(parse_interval("soon").is_err());
    }
}
