//! Download (and upload) progress on stderr: one byte bar per layer in flight on a terminal,
//! plain status lines about every five seconds otherwise (CI logs), nothing with
//! `--quiet`. Retry notes go through here too so they do not tear the bars.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use indicatif::{HumanBytes, MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};

use super::download::Observer;

/// How downloads are shown.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ProgressMode {
    /// Nothing at all.
    #[default]
    Quiet,
    /// Periodic plain lines (stderr is not a terminal).
    Lines,
    /// Live bars (stderr is a terminal).
    Bars,
}

const LINE_INTERVAL: Duration = Duration::from_secs(5);

struct Active {
    label: String,
    done: AtomicU64,
    total: u64,
}

pub struct Progress {
    mode: ProgressMode,
    multi: Option<MultiProgress>,
    /// Log lines (`-v`) are written with the bars suspended while this lives.
    _logs_suspend_bars: Option<crate::diag::DisplayGuard>,
    active: Mutex<Vec<Arc<Active>>>,
    last_lines: Mutex<Instant>,
    /// "downloaded" or "uploaded", for the line closing each blob.
    verb: &'static str,
}

impl Progress {
    pub fn new(mode: ProgressMode) -> Progress {
        let multi = (mode == ProgressMode::Bars)
            .then(|| MultiProgress::with_draw_target(ProgressDrawTarget::stderr()));
        let _logs_suspend_bars = multi.clone().map(|m| {
            crate::diag::register_display(Box::new(move |write: &mut dyn FnMut()| m.suspend(write)))
        });
        Progress {
            mode,
            multi,
            _logs_suspend_bars,
            active: Mutex::new(Vec::new()),
            last_lines: Mutex::new(Instant::now()),
            verb: "downloaded",
        }
    }

    /// The same display for blobs being pushed.
    pub fn for_uploads(mode: ProgressMode) -> Progress {
        Progress {
            verb: "uploaded",
            ..Progress::new(mode)
        }
    }

    /// A message for the user (retries, notes).
    pub fn note(&self, msg: &str) {
        match (&self.mode, &self.multi) {
            (ProgressMode::Quiet, _) => {}
            (_, Some(m)) => {
                let _ = m.println(format!("note: {msg}"));
            }
            _ => eprintln!("note: {msg}"),
        }
    }

    /// A blob starts downloading (or uploading).
    pub fn start(&self, label: String, total: u64) -> LayerProgress<'_> {
        let bar = self.multi.as_ref().map(|m| {
            let bar = m.add(ProgressBar::new(total));
            bar.set_style(
                ProgressStyle::with_template(
                    "{prefix} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
                )
                .unwrap_or_else(|_| ProgressStyle::default_bar())
                .progress_chars("=> "),
            );
            bar.set_prefix(label.clone());
            bar
        });
        let active = Arc::new(Active {
            label,
            done: AtomicU64::new(0),
            total,
        });
        if self.mode == ProgressMode::Lines {
            self.lock_active().push(active.clone());
        }
        LayerProgress {
            progress: self,
            active,
            bar,
        }
    }

    fn lock_active(&self) -> std::sync::MutexGuard<'_, Vec<Arc<Active>>> {
        self.active.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// In line mode, every [`LINE_INTERVAL`]: one line per blob in flight.
    fn maybe_print_lines(&self) {
        if self.mode != ProgressMode::Lines {
            return;
        }
        {
            let mut last = self.last_lines.lock().unwrap_or_else(|e| e.into_inner());
            if last.elapsed() < LINE_INTERVAL {
                return;
            }
            *last = Instant::now();
        }
        for a in self.lock_active().iter() {
            eprintln!(
                "{} {}/{}",
                a.label,
                HumanBytes(a.done.load(Ordering::Relaxed)),
                HumanBytes(a.total)
            );
        }
    }

    fn finished(&self, active: &Arc<Active>, bar: Option<&ProgressBar>, ok: bool, secs: f64) {
        if let Some(b) = bar {
            b.finish_and_clear();
            if let Some(m) = &self.multi {
                m.remove(b);
            }
        }
        if self.mode == ProgressMode::Lines {
            self.lock_active().retain(|a| !Arc::ptr_eq(a, active));
            if ok {
                eprintln!(
                    "{} {} {} in {secs:.1} s",
                    active.label,
                    HumanBytes(active.total),
                    self.verb
                );
            }
        }
    }

    /// The closing line: what was fetched and what the cache already had.
    pub fn summary(&self, line: &str) {
        match (&self.mode, &self.multi) {
            (ProgressMode::Quiet, _) => {}
            (_, Some(m)) => {
                let _ = m.println(line);
            }
            _ => eprintln!("{line}"),
        }
    }
}

/// The progress of one blob; reports byte counts from the downloader.
pub struct LayerProgress<'a> {
    progress: &'a Progress,
    active: Arc<Active>,
    bar: Option<ProgressBar>,
}

impl LayerProgress<'_> {
    /// The download ended (`ok`: successfully), after `secs` seconds.
    pub fn finish(self, ok: bool, secs: f64) {
        self.progress
            .finished(&self.active, self.bar.as_ref(), ok, secs);
    }
}

impl Observer for LayerProgress<'_> {
    fn advanced(&self, n: u64) {
        self.active.done.fetch_add(n, Ordering::Relaxed);
        if let Some(b) = &self.bar {
            b.inc(n);
        }
        self.progress.maybe_print_lines();
    }

    fn reset(&self) {
        self.active.done.store(0, Ordering::Relaxed);
        if let Some(b) = &self.bar {
            b.set_position(0);
        }
    }
}
