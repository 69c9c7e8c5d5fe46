//! Metering off the request path: a bounded queue feeding a batching writer.
//!
//! Handlers hand finished usage events to [`Meter::record`]. A single writer task takes
//! whatever is queued, waits up to `commit_delay_ms` after a batch's first event for more
//! (up to `max_batch`), and commits it in one transaction (group commit) through
//! `Fatura::record_events`, which is idempotent by event id. When the
//! database fails, the batch is appended to a local spill file (JSON lines, fsynced) and
//! replayed when the database answers again; replays of already-committed events count
//! as duplicates, so nothing is lost and nothing doubled. On shutdown the writer drains
//! the queue and makes a last replay attempt before returning.
//!
//! Crash window (documented in ARCHITECTURE.md): with `durability = "async"`, events
//! still in the in-memory queue when the process is killed (SIGKILL, power loss) are lost;
//! the queue holds at most the calls answered in the last moments (`commit_delay_ms` plus
//! one batch commit, typically milliseconds). With `durability = "sync"`, the response
//! waits for the commit.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

use chrono::{DateTime, Utc};
use fatura_core::{CustomerId, EventId, TokenUsage, UsageEvent};
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

use super::config::{Durability, GatewayConfig};
use crate::metrics::Metrics;
use crate::service::{Fatura, ServiceError};
use crate::wallet::WalletBook;

/// An event as written to the spill file.
#[derive(Debug, Serialize, Deserialize)]
struct Spilled {
    id: String,
    customer_id: String,
    timestamp: DateTime<Utc>,
    provider: String,
    model: String,
    input: u64,
    output: u64,
    cached: u64,
    cache_write: u64,
    reasoning: u64,
    requests: u64,
    tags: BTreeMap<String, String>,
    upstream_cost: Option<Decimal>,
    upstream: Option<String>,
    estimated: bool,
    /// The wallet charge of a prepaid call: replayed with the event, never lost.
    #[serde(default)]
    prepaid_charge: Option<Decimal>,
    /// The budget share the call was reserved from (fleet mode): instance and price.
    #[serde(default)]
    hold: Option<(String, Decimal)>,
}

impl From<&UsageEvent> for Spilled {
    fn from(e: &UsageEvent) -> Self {
        let u = &e.usage;
        Spilled {
            id: e.id.to_string(),
            customer_id: e.customer_id.to_string(),
            timestamp: e.timestamp,
            provider: e.provider.clone(),
            model: e.model.clone(),
            input: u.input(),
            output: u.output(),
            cached: u.cached_input(),
            cache_write: u.cache_write(),
            reasoning: u.reasoning(),
            requests: u.requests(),
            tags: e.tags.clone(),
            upstream_cost: e.upstream_cost,
            upstream: e.upstream.clone(),
            estimated: e.estimated,
            prepaid_charge: e.prepaid_charge,
            hold: e
                .budget_hold
                .as_ref()
                .map(|h| (h.instance.clone(), h.amount)),
        }
    }
}

impl Spilled {
    fn into_event(self) -> Result<UsageEvent, String> {
        let usage = TokenUsage::new(
            self.input,
            self.output,
            self.cached,
            self.cache_write,
            self.reasoning,
            self.requests,
        )
        .map_err(|e| e.to_string())?;
        let event = UsageEvent::new(
            EventId::parse(&self.id).map_err(|e| e.to_string())?,
            CustomerId::parse(&self.customer_id).map_err(|e| e.to_string())?,
            self.timestamp,
            self.provider,
            self.model,
            usage,
            self.tags,
            self.upstream_cost,
        )
        .map_err(|e| e.to_string())?;
        let mut event = match self.upstream {
            Some(u) => event
                .served_by(&u, self.estimated)
                .map_err(|e| e.to_string())?,
            None => event,
        };
        event.prepaid_charge = self.prepaid_charge;
        event.budget_hold = self
            .hold
            .map(|(instance, amount)| fatura_core::BudgetHold { instance, amount });
        Ok(event)
    }
}

enum Msg {
    Event(Box<UsageEvent>, Option<oneshot::Sender<bool>>),
}

/// The handle handlers use.
#[derive(Debug, Clone)]
pub struct Meter {
    tx: mpsc::Sender<Msg>,
    durability: Durability,
    depth: Arc<AtomicI64>,
}

impl std::fmt::Debug for Msg {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Msg")
    }
}

/// The writer task; await [`MeterWriter::finish`] after the server stopped to drain.
#[derive(Debug)]
pub struct MeterWriter {
    handle: JoinHandle<()>,
}

impl MeterWriter {
    /// Waits until every queued event is committed or spilled. Call after every
    /// [`Meter`] clone is dropped (the server has stopped).
    pub async fn finish(self) {
        if let Err(e) = self.handle.await {
            tracing::error!(error = %e, "metering writer failed");
        }
    }
}

impl Meter {
    /// Starts the writer (and, in fleet mode, the renewal of budget shares).
    pub fn start(
        fatura: Arc<Fatura>,
        config: &GatewayConfig,
        metrics: Arc<Metrics>,
    ) -> (Meter, MeterWriter) {
        let wallets = fatura.wallets().clone();
        wallets.start_renewals();
        let (tx, rx) = mpsc::channel(config.queue_capacity);
        let depth = Arc::new(AtomicI64::new(0));
        let spill_path = PathBuf::from(&config.spill_path);
        // Opened once and held: spilling must still work when the process is out of file
        // descriptors (overload), which is when the database is likeliest to fail.
        let spill = open_spill(&spill_path);
        let writer = Writer {
            fatura,
            rx,
            max_batch: config.max_batch,
            commit_delay: Duration::from_millis(config.commit_delay_ms),
            spill_path,
            spill,
            depth: depth.clone(),
            metrics,
            wallets,
        };
        let handle = tokio::spawn(writer.run());
        (
            Meter {
                tx,
                durability: config.durability,
                depth,
            },
            MeterWriter { handle },
        )
    }

    /// Queues an event. With `durability = "sync"` waits for its commit (or spill) and
    /// returns whether it is durable; otherwise returns once it is queued.
    pub async fn record(&self, event: UsageEvent) -> bool {
        self.depth.fetch_add(1, Ordering::Relaxed);
        match self.durability {
            Durability::Async => self
                .tx
                .send(Msg::Event(Box::new(event), None))
                .await
                .is_ok(),
            Durability::Sync => {
                let (ack, done) = oneshot::channel();
                if self
                    .tx
                    .send(Msg::Event(Box::new(event), Some(ack)))
                    .await
                    .is_err()
                {
                    return false;
                }
                done.await.unwrap_or(false)
            }
        }
    }

    /// Events queued and not yet committed.
    pub fn depth(&self) -> i64 {
        self.depth.load(Ordering::Relaxed)
    }
}

fn open_spill(path: &std::path::Path) -> Option<std::fs::File> {
    match std::fs::OpenOptions::new()
        .create(true)
        .read(true)
        .append(true)
        .open(path)
    {
        Ok(f) => Some(f),
        Err(e) => {
            tracing::error!(error = %e, path = %path.display(), "cannot open the spill file");
            None
        }
    }
}

struct Writer {
    fatura: Arc<Fatura>,
    rx: mpsc::Receiver<Msg>,
    max_batch: usize,
    commit_delay: Duration,
    spill_path: PathBuf,
    spill: Option<std::fs::File>,
    depth: Arc<AtomicI64>,
    metrics: Arc<Metrics>,
    wallets: Arc<WalletBook>,
}

impl Writer {
    async fn run(mut self) {
        // Events spilled by an earlier run are replayed first.
        let mut last_replay = std::time::Instant::now();
        let mut spill_pending = self
            .spill
            .as_ref()
            .and_then(|f| f.metadata().ok())
            .is_some_and(|m| m.len() > 0);
        loop {
            let first = if spill_pending {
                match tokio::time::timeout(Duration::from_millis(500), self.rx.recv()).await {
                    Ok(m) => m,
                    Err(_) => {
                        spill_pending = !self.replay_spill().await;
                        continue;
                    }
                }
            } else {
                self.rx.recv().await
            };
            let Some(first) = first else { break };
            let mut batch = vec![first];
            self.gather(&mut batch).await;
            if !self.write(batch).await {
                spill_pending = true;
            } else if spill_pending && last_replay.elapsed() >= Duration::from_secs(1) {
                // The database answers again: replay even while traffic never pauses.
                last_replay = std::time::Instant::now();
                spill_pending = !self.replay_spill().await;
            }
        }
        if spill_pending && !self.replay_spill().await {
            tracing::warn!(path = %self.spill_path.display(), "events remain in the spill file; they are replayed at next start");
        }
        // Every call's price has left its share or is in the spill file: the shares go back.
        self.wallets.release_all().await;
        tracing::info!("metering queue drained");
    }

    /// Adds to `batch` what arrives within `commit_delay` of its first event, up to
    /// `max_batch` (at once whatever is already queued; nothing more once the queue is
    /// closed, so that shutdown drains without waiting).
    async fn gather(&mut self, batch: &mut Vec<Msg>) {
        let deadline = tokio::time::Instant::now() + self.commit_delay;
        while batch.len() < self.max_batch {
            match self.rx.try_recv() {
                Ok(m) => batch.push(m),
                Err(mpsc::error::TryRecvError::Disconnected) => return,
                Err(mpsc::error::TryRecvError::Empty) => {
                    if self.commit_delay.is_zero() {
                        return;
                    }
                    match tokio::time::timeout_at(deadline, self.rx.recv()).await {
                        Ok(Some(m)) => batch.push(m),
                        Ok(None) | Err(_) => return,
                    }
                }
            }
        }
    }

    /// Commits a batch; on failure spills it. Returns whether it was committed.
    async fn write(&mut self, batch: Vec<Msg>) -> bool {
        let n = batch.len() as i64;
        let mut events = Vec::with_capacity(batch.len());
        let mut acks = Vec::new();
        for Msg::Event(e, ack) in batch {
            events.push(*e);
            if let Some(a) = ack {
                acks.push(a);
            }
        }
        let indexed: Vec<(usize, UsageEvent)> = events.iter().cloned().enumerate().collect();
        let result = self.fatura.record_events(indexed, self.fatura.now()).await;
        let committed = result.is_ok();
        let durable = match result {
            Ok(out) => {
                self.metrics.meter_commits.inc();
                self.metrics.events_accepted.inc_by(out.accepted);
                self.metrics.events_unpriced.inc_by(out.unpriced);
                self.wallets.written(&events, &out.inserted).await;
                true
            }
            Err(ServiceError::Internal(e)) => {
                tracing::warn!(error = %format!("{e:#}"), events = n, "database unavailable: spilling events");
                self.spill(&events)
            }
            Err(e) => {
                // Not a database failure: a bug in event construction. Keep the events.
                tracing::error!(error = %e, events = n, "gateway events rejected: spilling for inspection");
                self.spill(&events)
            }
        };
        self.depth.fetch_sub(n, Ordering::Relaxed);
        for a in acks {
            let _ = a.send(durable);
        }
        committed
    }

    fn spill(&self, events: &[UsageEvent]) -> bool {
        let result = (|| -> std::io::Result<()> {
            let mut f = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&self.spill_path)?;
            let mut buf = Vec::new();
            for e in events {
                serde_json::to_writer(&mut buf, &Spilled::from(e))?;
                buf.push(b'\n');
            }
            f.write_all(&buf)?;
            f.sync_all()
        })();
        match result {
            Ok(()) => {
                self.metrics.events_spilled.inc_by(events.len() as u64);
                true
            }
            Err(e) => {
                tracing::error!(error = %e, path = %self.spill_path.display(), "cannot write the spill file: events lost");
                false
            }
        }
    }

    /// Keeps an event the ledger refuses (it should never happen) in `<spill>.rejected` for an
    /// operator, with the reason in the log.
    fn reject(&self, event: &UsageEvent, reason: &str) {
        tracing::error!(event = %event.id, reason, "spilled event rejected by the ledger; kept in the .rejected file");
        let path = self.spill_path.with_extension("rejected");
        let line = serde_json::to_vec(&Spilled::from(event)).unwrap_or_default();
        let written = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .and_then(|mut f| {
                f.write_all(&line)
                    .and_then(|()| f.write_all(b"\n"))
                    .and_then(|()| f.sync_all())
            });
        if let Err(e) = written {
            tracing::error!(error = %e, path = %path.display(), "cannot write the rejected-events file");
        }
    }

    /// Replays the spill file; true when it is empty afterwards.
    async fn replay_spill(&mut self) -> bool {
        use std::io::Seek;
        let Some(file) = self.spill.as_mut() else {
            return true;
        };
        if let Err(e) = file.seek(std::io::SeekFrom::Start(0)) {
            tracing::error!(error = %e, "cannot read the spill file");
            return false;
        }
        let mut bytes = Vec::new();
        if let Err(e) = std::io::Read::read_to_end(file, &mut bytes) {
            tracing::error!(error = %e, "cannot read the spill file");
            return false;
        }
        let mut events = Vec::new();
        for line in bytes
            .split(|b| *b == b'\n')
            .filter(|l| !l.iter().all(u8::is_ascii_whitespace))
        {
            match serde_json::from_slice::<Spilled>(line)
                .map_err(|e| e.to_string())
                .and_then(Spilled::into_event)
            {
                Ok(e) => events.push(e),
                // A torn line (crash while appending) is not an event acknowledged in sync
                // mode (the append had not been fsynced); it is reported and skipped.
                Err(e) => tracing::error!(error = %e, "unreadable spill line skipped"),
            }
        }
        for chunk in events.chunks(self.max_batch) {
            let indexed: Vec<(usize, UsageEvent)> = chunk.iter().cloned().enumerate().collect();
            match self.fatura.record_events(indexed, self.fatura.now()).await {
                Ok(out) => self.wallets.written(chunk, &out.inserted).await,
                Err(ServiceError::Internal(e)) => {
                    tracing::debug!(error = %format!("{e:#}"), "spill replay deferred");
                    return false;
                }
                // Not a database failure: one event is at fault. Replay one by one and set
                // the faulty ones aside, so they cannot block the others forever.
                Err(_) => {
                    for event in chunk {
                        match self
                            .fatura
                            .record_events(vec![(0, event.clone())], self.fatura.now())
                            .await
                        {
                            Ok(out) => {
                                self.wallets
                                    .written(std::slice::from_ref(event), &out.inserted)
                                    .await;
                            }
                            Err(ServiceError::Internal(_)) => return false,
                            Err(e) => self.reject(event, &e.to_string()),
                        }
                    }
                }
            }
        }
        // Every spilled event is committed: empty the file (appends go to its end).
        if let Some(Err(e)) = self
            .spill
            .as_ref()
            .map(|f| f.set_len(0).and_then(|()| f.sync_all()))
        {
            tracing::error!(error = %e, "cannot empty the replayed spill file");
            return false;
        }
        tracing::info!(events = events.len(), "spilled events replayed");
        true
    }
}
