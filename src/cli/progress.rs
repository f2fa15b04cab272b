//! Progress of long command-line jobs: a bar redrawn in place when stderr
//! is a terminal, a plain line every ten seconds otherwise (logs, CI).

use std::{
    io::IsTerminal,
    time::{Duration, Instant},
};

/// How often a line is written when stderr is not a terminal.
const LINE_EVERY: Duration = Duration::from_secs(10);
/// How often the bar is redrawn on a terminal.
const REDRAW_EVERY: Duration = Duration::from_millis(200);

/// One job's progress on stderr.
pub(super) struct Progress {
    label: &'static str,
    unit: &'static str,
    total: u64,
    terminal: bool,
    last: Option<Instant>,
}

impl Progress {
    /// Progress of `label` towards `total` `unit`s.
    pub(super) fn new(label: &'static str, unit: &'static str, total: u64) -> Self {
        Self {
            label,
            unit,
            total,
            terminal: std::io::stderr().is_terminal(),
            last: None,
        }
    }

    /// Reports `done` units so far (drawn only as often as is useful).
    pub(super) fn set(&mut self, done: u64) {
        let every = if self.terminal {
            REDRAW_EVERY
        } else {
            LINE_EVERY
        };
        if self.last.is_some_and(|t| t.elapsed() < every) {
            return;
        }
        self.last = Some(Instant::now());
        self.draw(done);
    }

    /// Reports the end: the full bar, and a new line on a terminal.
    pub(super) fn finish(&mut self, done: u64) {
        self.draw(done);
        if self.terminal {
            eprintln!();
        }
    }

    fn draw(&self, done: u64) {
        let line = format!("{} {}", bar(self.label, done, self.total), self.unit);
        if self.terminal {
            eprint!("\r{line}\x1b[K");
        } else {
            eprintln!("{line}");
        }
    }
}

/// `label [#########...........]  45% 45000/100000`
pub(super) fn bar(label: &str, done: u64, total: u64) -> String {
    const WIDTH: usize = 24;
    let pct = percent(done, total);
    let filled = usize::try_from(pct).unwrap_or(100) * WIDTH / 100;
    format!(
        "{label} [{}{}] {pct:>3}% {done}/{total}",
        "#".repeat(filled),
        ".".repeat(WIDTH - filled),
    )
}

/// Whole percent of `done` in `total`, at most 100 (0 when `total` is 0).
pub(super) fn percent(done: u64, total: u64) -> u64 {
    (done.saturating_mul(100))
        .checked_div(total)
        .unwrap_or(0)
        .min(100)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_bar_fills_with_progress_and_never_overflows() {
        assert_eq!(
            bar("reindex", 50, 100),
            "reindex [############............]  50% 50/100"
        );
        assert!(bar("x", 0, 0).contains("[........................]   0%"));
        assert!(bar("x", 300, 100).contains("[########################] 100%"));
        assert_eq!(percent(u64::MAX, 10), 100);
    }
}
