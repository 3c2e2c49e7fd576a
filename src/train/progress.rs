//! A one-line progress display on stderr, redrawn in place on a terminal and printed every
//! `every` steps otherwise (so logs of non-interactive runs stay readable).

use std::io::{IsTerminal, Write};
use std::time::Instant;

pub struct Progress {
    total: usize,
    start: Instant,
    tty: bool,
    every: usize,
}

impl Progress {
    pub fn new(total: usize) -> Self {
        let tty = std::io::stderr().is_terminal();
        Progress {
            total,
            start: Instant::now(),
            tty,
            every: (total / 20).max(1),
        }
    }

    /// Shows step `done` of `total` with a status text.
    pub fn update(&self, done: usize, status: &str) {
        let elapsed = self.start.elapsed().as_secs_f64();
        let eta = if done > 0 {
            elapsed / done as f64 * (self.total - done.min(self.total)) as f64
        } else {
            0.0
        };
        let width = 24;
        let filled = width * done.min(self.total) / self.total.max(1);
        let bar = format!("{}{}", "#".repeat(filled), "-".repeat(width - filled));
        let line = format!(
            "[{bar}] {done}/{} {status} | {elapsed:.0}s, eta {eta:.0}s",
            self.total
        );
        let mut err = std::io::stderr();
        if self.tty {
            let _ = write!(err, "\r\x1b[2K{line}");
            if done >= self.total {
                let _ = writeln!(err);
            }
        } else if done.is_multiple_of(self.every) || done >= self.total {
            let _ = writeln!(err, "{line}");
        }
        let _ = err.flush();
    }
}
