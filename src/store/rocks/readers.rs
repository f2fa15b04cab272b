//! The reader threads: point reads that the memory tier could not answer
//! (their block is in no cache, so reading it may wait on the disk).
//!
//! Sent one by one to tokio's blocking pool, each such read cost two thread
//! wake-ups (the pool's thread, then the request's task), which at 10M
//! stored tokens, with most reads from files, doubled the runtime workers'
//! share of kernel scheduling. Here a reader that wakes takes every read
//! waiting in the queue (up to [`MAX_READS_PER_WAKE`]) and answers them
//! with one `MultiGet` per table, as the committer does for writes: under
//! load a busy reader finds the next reads queued and never sleeps.

use std::{
    collections::VecDeque,
    sync::{
        Arc, Condvar, Mutex, PoisonError,
        atomic::{AtomicU64, Ordering},
    },
    thread,
};

use rocksdb::DB;
use tokio::sync::oneshot;

use super::{cf, classify};
use crate::store::{Error, Table};

/// How many reader threads there are. More than the cores: a read that
/// waits on the device holds its thread, and the others go on.
const READER_THREADS: usize = 4;

/// How many queued reads one reader takes per wake-up at most, so that a
/// burst is shared among the readers rather than read by one in sequence.
const MAX_READS_PER_WAKE: usize = 16;

/// The values of one read's keys, in order.
type Values = Vec<Option<Vec<u8>>>;

/// One caller's read waiting for a reader.
struct Read {
    table: Table,
    keys: Vec<Vec<u8>>,
    done: oneshot::Sender<Result<Values, Error>>,
}

/// What the reader threads wait on, and the threads themselves.
#[derive(Default)]
struct Queue {
    state: Mutex<State>,
    ready: Condvar,
    /// Emptied by [`Readers::stop`].
    threads: Mutex<Vec<thread::JoinHandle<()>>>,
    /// Times a reader took reads from the queue, and reads it took.
    wakeups: AtomicU64,
    reads: AtomicU64,
}

#[derive(Default)]
struct State {
    pending: VecDeque<Read>,
    /// Readers waiting on `ready`: a read wakes one only if one sleeps.
    idle: usize,
    /// Set when the store closes: readers finish what is queued and stop.
    closed: bool,
}

/// How many times the readers woke and how many reads they served; their
/// ratio is the reads a wake-up carried.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ReaderStats {
    /// Times a reader woke and took reads from the queue.
    pub wakeups: u64,
    /// Reads the readers answered (each one caller's keys).
    pub reads: u64,
}

/// The reader threads of one store.
pub(super) struct Readers {
    queue: Arc<Queue>,
}

impl Readers {
    /// Starts [`READER_THREADS`] readers over `db`.
    pub(super) fn start(db: &Arc<DB>) -> Result<Self, Error> {
        let readers = Self {
            queue: Arc::new(Queue::default()),
        };
        for i in 0..READER_THREADS {
            let db = Arc::clone(db);
            let queue = Arc::clone(&readers.queue);
            let thread = thread::Builder::new()
                .name(format!("tokenvault-read-{i}"))
                .spawn(move || run_reader(&db, &queue))
                // Readers already started stop when `readers` drops.
                .map_err(|e| Error::Backend(format!("cannot start a reader thread: {e}")))?;
            readers
                .queue
                .threads
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .push(thread);
        }
        Ok(readers)
    }

    /// Reads `keys` of `table` at one snapshot, on a reader thread.
    pub(super) async fn read(&self, table: Table, keys: Vec<Vec<u8>>) -> Result<Values, Error> {
        let (done, result) = oneshot::channel();
        {
            let mut state = self.queue.lock();
            if state.closed {
                return Err(Error::Closed);
            }
            state.pending.push_back(Read { table, keys, done });
            if state.idle > 0 {
                self.queue.ready.notify_one();
            }
        }
        result
            .await
            .map_err(|_| Error::Backend("a storage reader thread stopped".into()))?
    }

    pub(super) fn stats(&self) -> ReaderStats {
        ReaderStats {
            wakeups: self.queue.wakeups.load(Ordering::Relaxed),
            reads: self.queue.reads.load(Ordering::Relaxed),
        }
    }

    /// Lets the readers finish what is queued, then waits for them.
    pub(super) fn stop(&self) {
        self.queue.lock().closed = true;
        self.queue.ready.notify_all();
        let threads = std::mem::take(
            &mut *self
                .queue
                .threads
                .lock()
                .unwrap_or_else(PoisonError::into_inner),
        );
        for thread in threads {
            if thread.join().is_err() {
                tracing::error!("a storage reader thread panicked");
            }
        }
    }
}

impl Drop for Readers {
    fn drop(&mut self) {
        self.stop();
    }
}

impl Queue {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Waits for reads and takes up to [`MAX_READS_PER_WAKE`] of them; none
    /// once the store is closed and the queue is empty.
    fn take(&self) -> Vec<Read> {
        let mut state = self.lock();
        while state.pending.is_empty() && !state.closed {
            state.idle += 1;
            state = self
                .ready
                .wait(state)
                .unwrap_or_else(PoisonError::into_inner);
            state.idle -= 1;
        }
        let taken = take_some(&mut state.pending);
        // Reads left over go to a sleeping reader rather than wait for this
        // one to finish its share.
        if !state.pending.is_empty() && state.idle > 0 {
            self.ready.notify_one();
        }
        drop(state);
        if !taken.is_empty() {
            self.wakeups.fetch_add(1, Ordering::Relaxed);
            self.reads.fetch_add(taken.len() as u64, Ordering::Relaxed);
        }
        taken
    }
}

/// Up to [`MAX_READS_PER_WAKE`] reads from the front of the queue, leaving
/// out those whose caller has gone (a cancelled request).
fn take_some(pending: &mut VecDeque<Read>) -> Vec<Read> {
    let mut taken = Vec::with_capacity(pending.len().min(MAX_READS_PER_WAKE));
    while taken.len() < MAX_READS_PER_WAKE {
        match pending.pop_front() {
            Some(read) if read.done.is_closed() => {}
            Some(read) => taken.push(read),
            None => break,
        }
    }
    taken
}

fn run_reader(db: &DB, queue: &Queue) {
    loop {
        let mut reads = queue.take();
        if reads.is_empty() {
            // Closed and drained, or every read taken had been cancelled.
            if queue.lock().closed {
                return;
            }
            continue;
        }
        while let Some(table) = reads.first().map(|read| read.table) {
            let (mine, rest) = reads.into_iter().partition(|read| read.table == table);
            answer(db, table, mine);
            reads = rest;
        }
    }
}

/// Reads the keys of every read of `table` with one `MultiGet` (one
/// snapshot for all of them) and gives each caller its own values.
fn answer(db: &DB, table: Table, reads: Vec<Read>) {
    let cf = match cf(db, table) {
        Ok(cf) => cf,
        Err(e) => {
            for read in reads {
                let _ = read.done.send(Err(e.duplicate()));
            }
            return;
        }
    };
    let keys = reads
        .iter()
        .flat_map(|read| read.keys.iter().map(move |key| (cf, key.as_slice())));
    let mut values = db.multi_get_cf(keys).into_iter();
    for read in reads {
        let mine = values
            .by_ref()
            .take(read.keys.len())
            .map(|value| value.map_err(classify))
            .collect();
        // The caller may have gone meanwhile (a cancelled request).
        let _ = read.done.send(mine);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A store that closes lets the reads already queued finish (they are
    /// queued here while the readers cannot take them), and refuses reads
    /// after.
    #[tokio::test]
    async fn reads_queued_when_the_readers_stop_are_answered() {
        let dir = tempfile::tempdir().unwrap();
        let store = super::super::tests::open(dir.path());
        let key = |i: u32| i.to_be_bytes().to_vec();
        let mut batch = crate::store::Batch::new();
        for i in 0..100 {
            batch.put(Table::Records, key(i), vec![1; 100]);
        }
        crate::store::Store::commit(&store, batch).await.unwrap();
        let readers = Readers::start(&store.db).unwrap();
        let answers: Vec<_> = {
            let mut state = readers.queue.lock();
            let answers = (0..100)
                .map(|i| {
                    let (done, answer) = oneshot::channel();
                    state.pending.push_back(Read {
                        table: Table::Records,
                        keys: vec![key(i)],
                        done,
                    });
                    answer
                })
                .collect();
            state.closed = true;
            answers
        };
        readers.stop();
        for answer in answers {
            assert_eq!(answer.await.unwrap().unwrap(), vec![Some(vec![1; 100])]);
        }
        let after = readers.read(Table::Records, vec![key(0)]).await;
        assert!(matches!(after, Err(Error::Closed)), "{after:?}");
    }

    #[test]
    fn a_wake_up_takes_a_bounded_share_and_skips_cancelled_reads() {
        let mut pending = VecDeque::new();
        let mut kept = Vec::new();
        for i in 0..40 {
            let (done, answer) = oneshot::channel();
            pending.push_back(Read {
                table: Table::Records,
                keys: vec![vec![i]],
                done,
            });
            // Every fourth caller has gone.
            if i % 4 != 0 {
                kept.push(answer);
            }
        }
        let taken = take_some(&mut pending);
        assert_eq!(taken.len(), MAX_READS_PER_WAKE);
        assert!(taken.iter().all(|read| read.keys[0][0] % 4 != 0));
        let rest = take_some(&mut pending);
        assert_eq!(taken.len() + rest.len() + take_some(&mut pending).len(), 30);
    }
}
