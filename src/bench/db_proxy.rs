//! A TCP proxy between vault replicas and a PostgreSQL unix socket, owned
//! by the benchmark and the tests: it adds latency each way, as a real
//! network between the vault and its database does (`tokenvault bench
//! --db-latency-ms`), and can cut the link like a partition (every
//! connection kept open and nothing passed either way, new connections
//! accepted and then ignored, as a peer behind a dead link is), or lose
//! the answer to one message (a COMMIT that the server applies and whose
//! reply never arrives), for the fault tests. The kernels this runs on may have no netem, and a proxy
//! needs no privileges.

use std::{
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::Duration,
};

use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt},
    net::{TcpListener, UnixStream},
    sync::{mpsc, oneshot, watch},
    time::Instant,
};

/// Wakes tasks at an instant, to a tenth of a millisecond or so: tokio's
/// timer has a 1 ms tick, which made a requested 0.5 ms each way a 3 ms
/// round trip. One thread for all the proxy's connections, sleeping until
/// the earliest instant asked for.
#[derive(Clone)]
struct Timer {
    requests: std::sync::mpsc::Sender<(std::time::Instant, oneshot::Sender<()>)>,
}

impl Timer {
    fn start() -> Self {
        let (requests, incoming) =
            std::sync::mpsc::channel::<(std::time::Instant, oneshot::Sender<()>)>();
        std::thread::spawn(move || {
            let mut pending: Vec<(std::time::Instant, oneshot::Sender<()>)> = Vec::new();
            loop {
                let now = std::time::Instant::now();
                let (due, later): (Vec<_>, Vec<_>) =
                    pending.drain(..).partition(|(at, _)| *at <= now);
                pending = later;
                for (_, wake) in due {
                    let _ = wake.send(());
                }
                let next = pending.iter().map(|(at, _)| *at).min();
                let received = match next {
                    Some(at) => incoming.recv_timeout(at.saturating_duration_since(now)),
                    None => incoming
                        .recv()
                        .map_err(|_| std::sync::mpsc::RecvTimeoutError::Disconnected),
                };
                match received {
                    Ok(request) => pending.push(request),
                    Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
                    Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => return,
                }
            }
        });
        Self { requests }
    }

    /// Returns at `at` (at once if it has passed).
    async fn until(&self, at: Instant) {
        let at = at.into_std();
        if at <= std::time::Instant::now() {
            return;
        }
        let (wake, woken) = oneshot::channel();
        if self.requests.send((at, wake)).is_ok() {
            let _ = woken.await;
        }
    }
}

/// A running proxy from a loopback port to a PostgreSQL unix socket.
pub struct DbProxy {
    port: u16,
    cut: watch::Sender<bool>,
    /// Added each way, in microseconds.
    latency_us: Arc<AtomicU64>,
    reply_loss: ReplyLoss,
    task: tokio::task::JoinHandle<()>,
}

/// The answer to lose: the next message towards the server that holds
/// `armed`, on whichever connection sends it first.
#[derive(Clone, Default)]
struct ReplyLoss {
    armed: Arc<Mutex<Option<Vec<u8>>>>,
    /// How many answers were lost so far.
    lost: Arc<AtomicU64>,
}

impl ReplyLoss {
    /// Whether `bytes`, sent towards the server, fire the armed loss: if so,
    /// the loss is disarmed and counted.
    fn fires(&self, bytes: &[u8]) -> bool {
        let mut armed = self
            .armed
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let hit = armed
            .as_ref()
            .is_some_and(|needle| bytes.windows(needle.len()).any(|w| w == needle.as_slice()));
        if hit {
            *armed = None;
            self.lost.fetch_add(1, Ordering::SeqCst);
        }
        hit
    }
}

impl DbProxy {
    /// Listens on a free loopback port and forwards every connection to
    /// the PostgreSQL socket in `socket_dir` (port 5432's).
    ///
    /// # Errors
    /// If no loopback port can be had.
    pub async fn start(socket_dir: &Path) -> std::io::Result<Self> {
        let upstream = socket_dir.join(".s.PGSQL.5432");
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let port = listener.local_addr()?.port();
        let (cut, cut_rx) = watch::channel(false);
        let latency_us = Arc::new(AtomicU64::new(0));
        let latency = Arc::clone(&latency_us);
        let reply_loss = ReplyLoss::default();
        let loss = reply_loss.clone();
        let timer = Timer::start();
        let task = tokio::spawn(async move {
            loop {
                let Ok((downstream, _)) = listener.accept().await else {
                    return;
                };
                let _ = downstream.set_nodelay(true);
                tokio::spawn(forward(
                    downstream,
                    upstream.clone(),
                    cut_rx.clone(),
                    Arc::clone(&latency),
                    loss.clone(),
                    timer.clone(),
                ));
            }
        });
        Ok(Self {
            port,
            cut,
            latency_us,
            reply_loss,
            task,
        })
    }

    /// A libpq connection string to database `dbname` through the proxy,
    /// naming the session `application_name` (so the test can find its
    /// backends in `pg_stat_activity`); in the clear, on loopback.
    pub fn conninfo(&self, dbname: &str, application_name: &str) -> String {
        format!(
            "host=127.0.0.1 port={} user=tokenvault dbname={dbname} application_name={application_name} sslmode=disable",
            self.port
        )
    }

    /// Cuts the link: nothing passes either way until [`DbProxy::heal`].
    pub fn cut(&self) {
        self.cut.send_replace(true);
    }

    /// Restores the link; what waited passes.
    pub fn heal(&self) {
        self.cut.send_replace(false);
    }

    /// Loses the answer to the next message towards the server that holds
    /// `needle` (e.g. `COMMIT`): the server gets the message and acts on
    /// it, and from then on nothing more of that connection reaches the
    /// client. Its client cannot tell that from a failed call.
    pub fn lose_reply_to(&self, needle: &[u8]) {
        *self
            .reply_loss
            .armed
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(needle.to_vec());
    }

    /// How many answers [`DbProxy::lose_reply_to`] lost so far.
    pub fn replies_lost(&self) -> u64 {
        self.reply_loss.lost.load(Ordering::SeqCst)
    }

    /// Adds `latency` to every byte each way, from now on.
    pub fn set_latency(&self, latency: Duration) {
        self.latency_us.store(
            u64::try_from(latency.as_micros()).unwrap_or(u64::MAX),
            Ordering::Relaxed,
        );
    }
}

impl Drop for DbProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Forwards one connection both ways, each direction through a pipe that
/// holds its bytes while the link is cut and delays them by the latency.
async fn forward(
    downstream: tokio::net::TcpStream,
    upstream: PathBuf,
    cut: watch::Receiver<bool>,
    latency_us: Arc<AtomicU64>,
    reply_loss: ReplyLoss,
    timer: Timer,
) {
    // While cut, a new connection is accepted and then ignored.
    let mut waiting = cut.clone();
    if waiting.wait_for(|cut| !cut).await.is_err() {
        return;
    }
    let Ok(upstream) = UnixStream::connect(&upstream).await else {
        return;
    };
    let (down_read, down_write) = downstream.into_split();
    let (up_read, up_write) = upstream.into_split();
    // Set once this connection's answer is lost: its replies are dropped.
    let deaf = Arc::new(AtomicBool::new(false));
    let (to_server, to_client) = (
        Direction::ToServer {
            reply_loss,
            deaf: Arc::clone(&deaf),
        },
        Direction::ToClient { deaf },
    );
    tokio::join!(
        pipe(
            down_read,
            up_write,
            cut.clone(),
            Arc::clone(&latency_us),
            timer.clone(),
            to_server,
        ),
        pipe(up_read, down_write, cut, latency_us, timer, to_client),
    );
}

/// Which way a pipe carries bytes, and what it does for a lost answer.
#[derive(Clone)]
enum Direction {
    /// Watches for the message whose answer is to be lost.
    ToServer {
        reply_loss: ReplyLoss,
        deaf: Arc<AtomicBool>,
    },
    /// Drops everything once the connection's answer is lost.
    ToClient { deaf: Arc<AtomicBool> },
}

/// One direction: a reader that timestamps chunks and a writer that sends
/// each once its latency has passed and the link is up. The channel is
/// small, so a cut link stops the reader too, and the sender's socket
/// buffers fill as they would behind a dead link.
async fn pipe(
    mut from: impl AsyncRead + Unpin,
    mut to: impl AsyncWrite + Unpin,
    mut cut: watch::Receiver<bool>,
    latency_us: Arc<AtomicU64>,
    timer: Timer,
    direction: Direction,
) {
    let (tx, mut rx) = mpsc::channel::<(Instant, Vec<u8>)>(16);
    let direction_out = direction.clone();
    let reader = async move {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            match from.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => {
                    if let Direction::ToServer { reply_loss, deaf } = &direction
                        && reply_loss.fires(&buf[..n])
                    {
                        deaf.store(true, Ordering::SeqCst);
                    }
                    let due =
                        Instant::now() + Duration::from_micros(latency_us.load(Ordering::Relaxed));
                    if tx.send((due, buf[..n].to_vec())).await.is_err() {
                        return;
                    }
                }
            }
        }
    };
    let writer = async move {
        while let Some((due, bytes)) = rx.recv().await {
            timer.until(due).await;
            if cut.wait_for(|cut| !cut).await.is_err() {
                return;
            }
            if let Direction::ToClient { deaf } = &direction_out
                && deaf.load(Ordering::SeqCst)
            {
                continue;
            }
            if to.write_all(&bytes).await.is_err() {
                return;
            }
        }
        // A close passes only once the link is up: behind a dead link the
        // other side never hears of it.
        if cut.wait_for(|cut| !cut).await.is_ok() {
            let _ = to.shutdown().await;
        }
    };
    tokio::join!(reader, writer);
}
