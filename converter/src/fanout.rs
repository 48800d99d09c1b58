//! Ordered fan-out: independent jobs `0..n` run on a few threads, their results
//! are consumed strictly in job order on the calling thread. Pass 1 uses it to
//! decode several layers at once while merging them bottom to top, so the
//! result (and every error message) is the one a single thread would give.

use std::collections::BTreeMap;
use std::sync::mpsc;
use std::sync::{Condvar, Mutex};

/// How far ahead of the consumer the workers may run (results held in memory).
const AHEAD_PER_WORKER: usize = 2;

/// Runs `job(i)` for every `i` in `0..n` on `workers` threads (1: on the calling
/// thread, one after the other) and calls `consume(i, result)` in order of `i`.
/// The first error of `consume` stops the jobs not yet started and is returned.
pub fn ordered<T, E>(
    n: usize,
    workers: usize,
    job: impl Fn(usize) -> T + Sync,
    mut consume: impl FnMut(usize, T) -> Result<(), E>,
) -> Result<(), E>
where
    T: Send,
{
    let workers = workers.clamp(1, n.max(1));
    if workers == 1 {
        for i in 0..n {
            consume(i, job(i))?;
        }
        return Ok(());
    }
    // `next` is the next job to start, `done` how many were consumed; a worker
    // starts job `next` only while it is within the look-ahead window.
    struct Window {
        next: usize,
        done: usize,
        stop: bool,
    }
    let window = Mutex::new(Window {
        next: 0,
        done: 0,
        stop: false,
    });
    let moved = Condvar::new();
    let ahead = workers * AHEAD_PER_WORKER;
    let take = || -> Option<usize> {
        let mut w = window.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            if w.stop || w.next >= n {
                return None;
            }
            if w.next < w.done + ahead {
                w.next += 1;
                return Some(w.next - 1);
            }
            w = moved.wait(w).unwrap_or_else(|e| e.into_inner());
        }
    };
    let (send, receive) = mpsc::channel::<(usize, T)>();
    std::thread::scope(|s| {
        for _ in 0..workers {
            let send = send.clone();
            let (take, job) = (&take, &job);
            s.spawn(move || {
                while let Some(i) = take() {
                    if send.send((i, job(i))).is_err() {
                        break;
                    }
                }
            });
        }
        drop(send);
        let finish = |w: &Mutex<Window>| {
            w.lock().unwrap_or_else(|e| e.into_inner()).stop = true;
            moved.notify_all();
        };
        let mut early: BTreeMap<usize, T> = BTreeMap::new();
        for i in 0..n {
            let result = loop {
                if let Some(r) = early.remove(&i) {
                    break r;
                }
                match receive.recv() {
                    Ok((j, r)) => {
                        early.insert(j, r);
                    }
                    // Workers only stop early after a stop: not reached.
                    Err(_) => unreachable!("a fan-out worker ended without its result"),
                }
            };
            if let Err(e) = consume(i, result) {
                finish(&window);
                return Err(e);
            }
            window.lock().unwrap_or_else(|e| e.into_inner()).done = i + 1;
            moved.notify_all();
        }
        finish(&window);
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[test]
    fn results_arrive_in_order_whatever_the_workers() {
        for workers in [1, 2, 4] {
            let mut seen = Vec::new();
            ordered::<_, ()>(
                20,
                workers,
                |i| {
                    // Later jobs finish first.
                    std::thread::sleep(std::time::Duration::from_millis((20 - i as u64) / 4));
                    i * 10
                },
                |i, r| {
                    seen.push((i, r));
                    Ok(())
                },
            )
            .unwrap();
            let want: Vec<_> = (0..20).map(|i| (i, i * 10)).collect();
            assert_eq!(seen, want, "{workers} workers");
        }
    }

    #[test]
    fn an_error_stops_the_jobs_not_started() {
        let started = AtomicUsize::new(0);
        let r = ordered(
            100,
            2,
            |i| {
                started.fetch_add(1, Ordering::Relaxed);
                i
            },
            |i, _| if i == 3 { Err(i) } else { Ok(()) },
        );
        assert_eq!(r, Err(3));
        // The window bounds how far the workers ran ahead of the failure.
        assert!(started.load(Ordering::Relaxed) <= 4 + 2 * AHEAD_PER_WORKER);
    }
}
