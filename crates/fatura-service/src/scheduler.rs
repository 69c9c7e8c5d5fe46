//! Billing runs and the background work of `fatura serve`: one place that closes cycles,
//! finalises drafts, collects payments and prunes what is no longer read, whoever asks
//! (the scheduler, `POST /v1/billing/run`).

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};

use super::{BillingPolicy, Fatura, RunReport, ServiceResult};
use crate::payments::Collector;

/// The lease that makes one instance of a fleet run the background work.
pub const SCHEDULER_LEASE: &str = "scheduler";

/// How long a scheduler lease lasts without renewal: three periods, at least 30 s.
pub fn scheduler_lease(every: Duration) -> Duration {
    (every * 3).max(Duration::from_secs(30))
}

/// Billing and collection, with the policies they run under.
#[derive(Debug, Clone)]
pub struct Scheduler {
    fatura: Arc<Fatura>,
    payments: Option<Arc<Collector>>,
    policy: BillingPolicy,
}

impl Scheduler {
    /// Billing under `policy`, collecting through `payments` when a processor is configured.
    pub fn new(
        fatura: Arc<Fatura>,
        payments: Option<Arc<Collector>>,
        policy: BillingPolicy,
    ) -> Self {
        Scheduler {
            fatura,
            payments,
            policy,
        }
    }

    /// Closes the cycles ended by `at` and finalises drafts past their grace period
    /// ([`Fatura::run_billing`]), then collects what is due. The invoices are returned as
    /// they stand after collection (a zero invoice is paid at once).
    pub async fn run_billing(&self, at: DateTime<Utc>) -> ServiceResult<RunReport> {
        let mut report = self.fatura.run_billing(at, self.policy).await?;
        if let Some(c) = &self.payments {
            c.collect_due(at).await?;
            for inv in &mut report.finalized {
                *inv = self.fatura.invoice(&inv.id).await?;
            }
        }
        Ok(report)
    }

    /// One run of the background work — billing (drafts, finalisation), the pruning of
    /// minute rollups past their retention and of past rate-limit windows, and collection —
    /// if this instance holds (or can take) the scheduler lease; instances sharing a
    /// database take turns only when the holder stops renewing (it stopped or died: its
    /// lease runs out). Every job is idempotent and works from the database's state, so a
    /// run cut short is finished by the next holder. Returns whether this instance ran it.
    pub async fn tick(&self, now: DateTime<Utc>, lease: Duration) -> bool {
        let until =
            now + chrono::Duration::from_std(lease).unwrap_or(chrono::Duration::seconds(30));
        let store = self.fatura.store();
        match store
            .acquire_lease(SCHEDULER_LEASE, self.fatura.instance_id(), now, until)
            .await
        {
            Ok(true) => {}
            Ok(false) => return false,
            Err(e) => {
                tracing::warn!(error = %e, "cannot take the scheduler lease; retrying at the next tick");
                return false;
            }
        }
        match self.fatura.run_billing(now, self.policy).await {
            Ok(report) => {
                for inv in &report.finalized {
                    tracing::info!(invoice = %inv.id, number = ?inv.number, total = %inv.total, "invoice finalised");
                }
                for f in &report.failed {
                    tracing::warn!(customer = %f.customer_id, code = f.code, error = %f.message, "customer not billed; retrying at the next tick");
                }
            }
            Err(e) => tracing::warn!(error = %e, "billing run failed; retrying at the next tick"),
        }
        if let Err(e) = self.fatura.prune_minute_rollups(now).await {
            tracing::warn!(error = %e, "pruning minute rollups failed; retrying at the next tick");
        }
        // Rate-limit windows of past minutes (fleet mode) are no longer read.
        let two_minutes_ago = (now - chrono::Duration::minutes(2)).timestamp_micros();
        if let Err(e) = store.prune_rate_windows(two_minutes_ago).await {
            tracing::warn!(error = %e, "pruning rate-limit windows failed; retrying at the next tick");
        }
        if let Some(c) = &self.payments
            && let Err(e) = c.collect_due(now).await
        {
            tracing::warn!(error = %e, "collection failed; retrying at the next tick");
        }
        true
    }

    /// Runs [`Scheduler::tick`] every `every` until the task is dropped (inside `fatura serve`).
    pub async fn run(self, every: Duration) {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            self.tick(self.fatura.now(), scheduler_lease(every)).await;
        }
    }

    /// Gives the scheduler lease up (on a clean stop), so that another instance takes over
    /// at its next tick rather than when the lease runs out.
    pub async fn release_lease(&self) {
        if let Err(e) = self
            .fatura
            .store()
            .release_lease(SCHEDULER_LEASE, self.fatura.instance_id())
            .await
        {
            tracing::warn!(error = %e, "cannot release the scheduler lease");
        }
    }
}
