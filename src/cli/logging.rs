//! Where the server's log lines go: stderr, through one background thread
//! that writes them in batches.
//!
//! A request logs one line when it finishes. Writing it from the request's
//! own task would put a `write(2)` on the request path; handing each line to
//! a thread over a channel (what `tracing-appender` does) instead costs a
//! wake-up of that thread, a futex call and a context switch, for every
//! line: on the development machine that was about a tenth of the server's
//! CPU under single-item load. Here a line is appended to a shared buffer
//! under a mutex and nobody is woken, except the writer thread when it is
//! idle. Once woken, the thread lets lines gather for [`GATHER`], writes
//! all of them with one system call, and goes back to sleep only when the
//! buffer stayed empty. A line therefore reaches stderr within a few
//! milliseconds, a busy server pays a few hundred system calls per second
//! for its log instead of one per request, and an idle one pays none.
//!
//! Nothing is dropped while the guard lives: a producer that finds
//! [`MAX_PENDING`] bytes waiting blocks until the thread has written them (a
//! stuck stderr stalls requests rather than losing their log lines).
//! Dropping the [`Flush`] guard writes what is left and stops the thread;
//! lines logged after that are not written.

use std::{
    io::Write,
    sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError},
    thread,
    time::Duration,
};

use tracing_subscriber::fmt::MakeWriter;

/// How long the writer thread lets lines gather after it wakes.
const GATHER: Duration = Duration::from_millis(2);

/// Bytes waiting beyond which a producer waits for the writer thread.
const MAX_PENDING: usize = 8 << 20;

/// The buffer and the writer thread's state, under one mutex.
#[derive(Default)]
struct State {
    pending: Vec<u8>,
    /// The thread waits for a signal (it found the buffer empty): the next
    /// line must wake it.
    idle: bool,
    /// The guard was dropped: write what is left and stop.
    closing: bool,
}

#[derive(Default)]
struct Shared {
    state: Mutex<State>,
    /// Signalled to the writer thread: lines arrived while it was idle, the
    /// buffer is full, or the guard was dropped.
    wake: Condvar,
    /// Signalled to blocked producers when the buffer has been taken.
    room: Condvar,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock leaves a valid byte buffer.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// The `MakeWriter` handed to `tracing_subscriber`: cheap to clone, one per
/// log line.
#[derive(Clone)]
pub struct BatchingStderr {
    shared: Arc<Shared>,
}

/// Keeps the writer thread running; dropping it writes what is buffered and
/// stops the thread.
pub struct Flush {
    shared: Arc<Shared>,
    thread: Option<thread::JoinHandle<()>>,
}

/// Starts the writer thread.
///
/// # Errors
/// If the thread cannot be started.
pub fn batching_stderr() -> Result<(BatchingStderr, Flush), String> {
    batching(std::io::stderr())
}

fn batching(out: impl Write + Send + 'static) -> Result<(BatchingStderr, Flush), String> {
    let shared = Arc::new(Shared::default());
    let thread = {
        let shared = Arc::clone(&shared);
        thread::Builder::new()
            .name("tokenvault-log".into())
            .spawn(move || write_batches(&shared, out))
            .map_err(|e| format!("cannot start the log writer thread: {e}"))?
    };
    Ok((
        BatchingStderr {
            shared: Arc::clone(&shared),
        },
        Flush {
            shared,
            thread: Some(thread),
        },
    ))
}

/// The writer thread: sleep until woken, let lines gather, write them all.
fn write_batches(shared: &Shared, mut out: impl Write) {
    let mut batch = Vec::new();
    let mut state = shared.lock();
    loop {
        if state.pending.is_empty() {
            if state.closing {
                return;
            }
            state.idle = true;
            state = shared
                .wake
                .wait(state)
                .unwrap_or_else(PoisonError::into_inner);
            state.idle = false;
            if !state.closing && state.pending.len() < MAX_PENDING {
                drop(state);
                thread::sleep(GATHER);
                state = shared.lock();
            }
            continue;
        }
        std::mem::swap(&mut batch, &mut state.pending);
        shared.room.notify_all();
        drop(state);
        // A failing stderr has nowhere to be reported; the lines are
        // dropped rather than retried forever.
        let _ = out.write_all(&batch).and_then(|()| out.flush());
        batch.clear();
        if batch.capacity() > MAX_PENDING {
            batch.shrink_to(MAX_PENDING);
        }
        thread::sleep(GATHER);
        state = shared.lock();
    }
}

impl Drop for Flush {
    fn drop(&mut self) {
        self.shared.lock().closing = true;
        self.shared.wake.notify_one();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// One log line on its way into the buffer.
pub struct Line<'a> {
    shared: &'a Shared,
}

impl Write for Line<'_> {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        let mut state = self.shared.lock();
        while state.pending.len() >= MAX_PENDING && !state.closing {
            state = self
                .shared
                .room
                .wait(state)
                .unwrap_or_else(PoisonError::into_inner);
        }
        state.pending.extend_from_slice(bytes);
        if state.idle || state.pending.len() >= MAX_PENDING {
            state.idle = false;
            self.shared.wake.notify_one();
        }
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> MakeWriter<'a> for BatchingStderr {
    type Writer = Line<'a>;

    fn make_writer(&'a self) -> Self::Writer {
        Line {
            shared: &self.shared,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A `Write` that hands what it gets to the test.
    #[derive(Clone, Default)]
    struct Capture(Arc<Mutex<Vec<u8>>>);

    impl Write for Capture {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(bytes);
            Ok(bytes.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn line(writer: &BatchingStderr, text: &str) {
        writer.make_writer().write_all(text.as_bytes()).unwrap();
    }

    #[test]
    fn every_line_from_every_thread_arrives_whole_and_in_order_per_thread() {
        let out = Capture::default();
        let (writer, flush) = batching(out.clone()).unwrap();
        let threads: Vec<_> = (0..4)
            .map(|t| {
                let writer = writer.clone();
                thread::spawn(move || {
                    for i in 0..5_000 {
                        line(&writer, &format!("t{t} line {i}\n"));
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        drop(flush);
        let text = String::from_utf8(out.0.lock().unwrap().clone()).unwrap();
        for t in 0..4 {
            let mine: Vec<&str> = text
                .lines()
                .filter(|l| l.starts_with(&format!("t{t} ")))
                .collect();
            let expected: Vec<String> = (0..5_000).map(|i| format!("t{t} line {i}")).collect();
            assert_eq!(mine, expected, "thread {t}'s lines");
        }
        assert_eq!(text.lines().count(), 20_000);
    }

    #[test]
    fn a_line_reaches_the_output_without_more_lines_or_a_flush() {
        let out = Capture::default();
        let (writer, _flush) = batching(out.clone()).unwrap();
        // Twice: the thread goes idle after the first line and must wake
        // for the second.
        for text in ["first\n", "second\n"] {
            line(&writer, text);
            let deadline = std::time::Instant::now() + Duration::from_secs(10);
            while !String::from_utf8_lossy(&out.0.lock().unwrap()).contains(text) {
                assert!(
                    std::time::Instant::now() < deadline,
                    "{text:?} was not written"
                );
                thread::sleep(Duration::from_millis(1));
            }
        }
    }

    #[test]
    fn a_full_buffer_holds_producers_back_instead_of_dropping_lines() {
        /// An output that takes its time, so the buffer fills.
        #[derive(Clone, Default)]
        struct Slow(Capture);
        impl Write for Slow {
            fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
                thread::sleep(Duration::from_millis(20));
                self.0.write(bytes)
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let out = Slow::default();
        let (writer, flush) = batching(out.clone()).unwrap();
        let big = "x".repeat(1 << 20) + "\n";
        for _ in 0..40 {
            line(&writer, &big);
        }
        drop(flush);
        assert_eq!(out.0.0.lock().unwrap().len(), 40 * big.len());
    }
}
