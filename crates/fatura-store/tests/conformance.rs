//! The `Store` contract, run against both databases: SQLite on a temporary file, and
//! PostgreSQL on a fresh database (`fatura_t_<hex>`, created from
//! `FATURA_TEST_POSTGRES_URL` and dropped at the end). Every test below runs once per
//! backend (see `conformance!` at the end).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use fatura_core::status::{
    CustomerStatus, InvoiceKind, InvoiceStatus, MovementKind, PaymentKind, PaymentStatus,
};
use std::collections::BTreeMap;
use std::str::FromStr;
use std::sync::Arc;

use chrono::{DateTime, Duration, SubsecRound, TimeZone, Utc};
use fatura_core::catalog::{PriceComponents, UnitPrice};
use fatura_core::import::ImportedPrice;
use fatura_core::rollup::{Dims, FLEET, Grain, RollupDelta, RollupKey, RollupTotals};
use fatura_core::usage::GroupBy;
use fatura_core::{Currency, CustomerId, EventId, TokenUsage, UsageEvent};
use fatura_store::{
    AlertRecord, BillingSettings, Customer, EventPricing, FxRate, InvoiceRecord, PreparedEvent,
    PriceImport, PricingChange, Store, StoreError, UsageFilter, WalletTransaction,
};
use rust_decimal::Decimal;
use sqlx::Connection;

// ---------------------------------------------------------------------------------------
// Harness

/// A store on a fresh database, removed when dropped.
struct TestDb {
    store: Arc<dyn Store>,
    _dir: Option<tempfile::TempDir>,
    pg_database: Option<String>,
}

fn postgres_admin_url() -> String {
    std::env::var("FATURA_TEST_POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into())
}

fn with_database(url: &str, db: &str) -> String {
    let i = url.rfind('/').expect("a database in the PostgreSQL URL");
    format!("{}/{db}", &url[..i])
}

impl TestDb {
    async fn sqlite() -> TestDb {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}", dir.path().join("fatura.db").display());
        let store = fatura_store::connect(&url, 4).await.unwrap();
        store.migrate().await.unwrap();
        assert_eq!(store.backend(), "sqlite");
        TestDb {
            store,
            _dir: Some(dir),
            pg_database: None,
        }
    }

    async fn postgres() -> TestDb {
        let admin = postgres_admin_url();
        let name = format!("fatura_t_{:016x}", rand::random::<u64>());
        let mut conn = sqlx::PgConnection::connect(&admin)
            .await
            .expect("PostgreSQL runs at FATURA_TEST_POSTGRES_URL (scripts/test starts it)");
        sqlx::query(&format!("CREATE DATABASE {name}"))
            .execute(&mut conn)
            .await
            .unwrap();
        conn.close().await.unwrap();
        let db = TestDb {
            store: fatura_store::connect(&with_database(&admin, &name), 4)
                .await
                .unwrap(),
            _dir: None,
            pg_database: Some(name),
        };
        db.store.migrate().await.unwrap();
        assert_eq!(db.store.backend(), "postgres");
        db
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let Some(name) = self.pg_database.take() else {
            return;
        };
        // Drop cannot be async: drop the database from a runtime of its own.
        let admin = postgres_admin_url();
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                if let Ok(mut conn) = sqlx::PgConnection::connect(&admin).await {
                    let _ = sqlx::query(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                        .execute(&mut conn)
                        .await;
                }
            });
        })
        .join();
    }
}

/// One `#[tokio::test]` per backend for each listed `async fn(&dyn Store)`.
macro_rules! conformance {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $( #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
               async fn $name() {
                   let db = super::TestDb::sqlite().await;
                   super::$name(db.store.as_ref()).await;
               } )*
        }
        mod postgres {
            $( #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
               async fn $name() {
                   let db = super::TestDb::postgres().await;
                   super::$name(db.store.as_ref()).await;
               } )*
        }
    };
}

conformance!(
    customers_and_amounts_round_trip_exactly,
    event_inserts_are_idempotent_and_conflicts_write_nothing,
    catalog_revisions_refuse_stale_costing,
    pricing_changes_bump_the_revision_and_rates_are_history,
    invoices_are_claimed_once_and_numbered_without_gaps,
    credit_notes_are_capped_at_the_invoice_total,
    wallet_movements_add_up_and_page,
    rollups_equal_a_recount,
    usage_queries_filter_by_tags_and_page,
    alerts_outcomes_payments_and_leases,
);

// ---------------------------------------------------------------------------------------
// Builders

fn d(s: &str) -> Decimal {
    Decimal::from_str(s).unwrap()
}

fn t(s: &str) -> DateTime<Utc> {
    DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
}

fn customer(id: &str, currency: Currency, prepaid: bool) -> Customer {
    Customer {
        id: id.into(),
        name: format!("Customer {id}"),
        currency,
        prepaid,
        monthly_spend_limit: None,
        billing: BillingSettings::default(),
        stripe_customer_id: None,
        status: CustomerStatus::Active,
        status_reason: None,
        payment_method_id: None,
        auto_top_up: None,
        created_at: t("2026-01-01T00:00:00Z"),
    }
}

struct Ev<'a> {
    id: &'a str,
    customer: &'a str,
    ts: DateTime<Utc>,
    model: &'a str,
    input: u64,
    output: u64,
    agent: Option<&'a str>,
    /// (version, cost, revenue)
    pricing: Option<(i64, &'a str, &'a str)>,
    prepaid_charge: Option<&'a str>,
}

impl<'a> Ev<'a> {
    fn new(id: &'a str, customer: &'a str, ts: DateTime<Utc>) -> Self {
        Ev {
            id,
            customer,
            ts,
            model: "openai/gpt-4o",
            input: 1000,
            output: 100,
            agent: None,
            pricing: None,
            prepaid_charge: None,
        }
    }

    fn priced(mut self, version: i64, cost: &'a str, revenue: &'a str) -> Self {
        self.pricing = Some((version, cost, revenue));
        self
    }

    fn agent(mut self, agent: &'a str) -> Self {
        self.agent = Some(agent);
        self
    }

    fn model(mut self, model: &'a str) -> Self {
        self.model = model;
        self
    }

    fn tokens(mut self, input: u64, output: u64) -> Self {
        self.input = input;
        self.output = output;
        self
    }

    fn charge(mut self, amount: &'a str) -> Self {
        self.prepaid_charge = Some(amount);
        self
    }

    /// The prepared event; `hash` stands for its content hash.
    fn prepared(&self, hash: &str) -> PreparedEvent {
        let mut tags = BTreeMap::new();
        if let Some(a) = self.agent {
            tags.insert("agent".to_string(), a.to_string());
        }
        tags.insert("team.name".to_string(), format!("team-{}", self.customer));
        PreparedEvent {
            event: UsageEvent {
                id: EventId::parse(self.id).unwrap(),
                customer_id: CustomerId::parse(self.customer).unwrap(),
                timestamp: self.ts,
                provider: "openrouter".into(),
                model: self.model.into(),
                usage: TokenUsage::new(self.input, self.output, 0, 0, 0, 1).unwrap(),
                tags,
                upstream_cost: None,
                upstream: None,
                estimated: false,
                prepaid_charge: self.prepaid_charge.map(d),
                budget_hold: None,
            },
            content_hash: hash.into(),
            pricing: self.pricing.map(|(v, c, r)| EventPricing {
                price_version_id: v,
                cost: d(c),
                revenue: d(r),
            }),
            ingested_at: self.ts + Duration::seconds(1),
        }
    }
}

fn prices(prompt: &str, completion: &str) -> PriceComponents {
    PriceComponents {
        prompt: UnitPrice::new(d(prompt)).unwrap(),
        completion: UnitPrice::new(d(completion)).unwrap(),
        cache_read: Some(UnitPrice::new(d("0.00000125")).unwrap()),
        cache_write: None,
        reasoning: None,
        per_request: UnitPrice::ZERO,
        per_image: UnitPrice::ZERO,
        web_search: UnitPrice::new(d("0.01")).unwrap(),
    }
}

fn import(model: &str, from: &str, expected_revision: i64) -> PriceImport {
    PriceImport {
        effective_from: t(from),
        source: "openrouter".into(),
        imported_at: t("2026-01-01T00:00:00Z"),
        create: vec![(
            ImportedPrice {
                provider: "openrouter".into(),
                model: model.into(),
                prices: prices("0.0000025", "0.00001"),
            },
            None,
        )],
        expected_revision,
    }
}

fn invoice(id: &str, customer: &str, month: u32, total: &str, events: i64) -> InvoiceRecord {
    let start = Utc.with_ymd_and_hms(2026, month, 1, 0, 0, 0).unwrap();
    let end = Utc.with_ymd_and_hms(2026, month + 1, 1, 0, 0, 0).unwrap();
    InvoiceRecord {
        id: id.into(),
        customer_id: customer.into(),
        kind: InvoiceKind::Invoice,
        number: None,
        status: InvoiceStatus::Draft,
        period_start: start,
        period_end: end,
        currency: Currency::Usd,
        subtotal: d(total),
        tax: d("0.00"),
        total: d(total),
        prepaid_applied: d("0.00"),
        prepaid_excess: d("0.00"),
        amount_due: d(total),
        document: "{}".into(),
        corrects_invoice_id: None,
        events,
        created_at: end,
        finalized_at: None,
        due_at: None,
        paid_at: None,
        voided_at: None,
        payment_attempts: 0,
        payment_reference: None,
        last_payment_error: None,
    }
}

fn credit_note(id: &str, of: &InvoiceRecord, amount: &str) -> InvoiceRecord {
    InvoiceRecord {
        id: id.into(),
        kind: InvoiceKind::CreditNote,
        status: InvoiceStatus::Open,
        subtotal: d(amount),
        tax: d("0.00"),
        total: d(amount),
        amount_due: d("0.00"),
        corrects_invoice_id: Some(of.id.clone()),
        events: 0,
        finalized_at: Some(t("2026-04-10T00:00:00Z")),
        created_at: t("2026-04-10T00:00:00Z"),
        ..of.clone()
    }
}

fn credit(id: &str, customer: &str, amount: &str, at: &str) -> WalletTransaction {
    WalletTransaction {
        id: id.into(),
        customer_id: customer.into(),
        kind: MovementKind::Purchased,
        amount: d(amount),
        currency: Currency::Brl,
        event_id: None,
        expires_at: None,
        created_at: t(at),
    }
}

// ---------------------------------------------------------------------------------------
// The contract

async fn customers_and_amounts_round_trip_exactly(store: &dyn Store) {
    let mut c = customer("cus_a", Currency::Eur, false);
    c.monthly_spend_limit = Some(d("1234.5678"));
    c.billing.tax_rate = Some(d("0.0725"));
    c.billing.anchor_day = 15;
    store.create_customer(&c).await.unwrap();
    assert!(matches!(
        store.create_customer(&c).await,
        Err(StoreError::Conflict(_))
    ));
    assert_eq!(store.get_customer("cus_a").await.unwrap(), Some(c.clone()));
    assert_eq!(store.get_customer("cus_nobody").await.unwrap(), None);

    assert!(store.set_spend_limit("cus_a", None).await.unwrap());
    assert!(!store.set_spend_limit("cus_nobody", None).await.unwrap());
    assert!(
        store
            .set_auto_top_up("cus_a", Some((d("10.50"), d("100.00"))))
            .await
            .unwrap()
    );
    let got = store.get_customer("cus_a").await.unwrap().unwrap();
    assert_eq!(got.monthly_spend_limit, None);
    assert_eq!(got.auto_top_up, Some((d("10.50"), d("100.00"))));
    assert_eq!(
        got.auto_top_up.map(|(a, b)| (a.to_string(), b.to_string())),
        Some(("10.50".into(), "100.00".into())),
        "decimals keep their scale"
    );
    assert_eq!(
        store
            .set_stripe_customer_id("cus_a", "cus_stripe_1")
            .await
            .unwrap(),
        "cus_stripe_1"
    );
    assert_eq!(
        store
            .set_stripe_customer_id("cus_a", "cus_stripe_2")
            .await
            .unwrap(),
        "cus_stripe_1",
        "the first Stripe id stays"
    );

    store
        .create_customer(&customer("cus_b", Currency::Usd, true))
        .await
        .unwrap();
    let ids: Vec<String> = store
        .list_customers()
        .await
        .unwrap()
        .into_iter()
        .map(|c| c.id)
        .collect();
    assert_eq!(ids, ["cus_a", "cus_b"]);
    let asked: Vec<String> = (0..300)
        .map(|i| format!("cus_{i}"))
        .chain(["cus_b".into()])
        .collect();
    let found = store.existing_customer_ids(&asked).await.unwrap();
    assert_eq!(found.len(), 1);
    assert!(found.contains("cus_b"));
}

async fn event_inserts_are_idempotent_and_conflicts_write_nothing(store: &dyn Store) {
    store
        .create_customer(&customer("c1", Currency::Usd, false))
        .await
        .unwrap();
    let rev = store.catalog_revision().await.unwrap();
    let base = t("2026-03-01T12:00:00Z");
    let a = Ev::new("evt_a", "c1", base);
    let b = Ev::new("evt_b", "c1", base + Duration::minutes(1));
    let c = Ev::new("evt_c", "c1", base + Duration::minutes(2));
    let dd = Ev::new("evt_d", "c1", base + Duration::minutes(3));

    let first = store
        .insert_events(&[a.prepared("h-a"), b.prepared("h-b")], rev)
        .await
        .unwrap();
    assert_eq!(
        (first.accepted, first.duplicates, first.unpriced),
        (2, 0, 2)
    );
    assert_eq!(first.inserted.len(), 2);
    assert!(first.inserted.contains("evt_a") && first.inserted.contains("evt_b"));

    // The same content again is a duplicate; a new id in the same call is recorded.
    let again = store
        .insert_events(&[a.prepared("h-a"), c.prepared("h-c")], rev)
        .await
        .unwrap();
    assert_eq!((again.accepted, again.duplicates), (1, 1));
    assert_eq!(
        again.inserted.iter().cloned().collect::<Vec<_>>(),
        ["evt_c"]
    );
    assert_eq!(store.count_events().await.unwrap(), 3);

    // Other content under a known id fails the whole call: evt_d is not written either.
    let err = store
        .insert_events(&[dd.prepared("h-d"), b.prepared("h-b-changed")], rev)
        .await
        .unwrap_err();
    match err {
        StoreError::EventConflict { id } => assert_eq!(id, "evt_b"),
        other => panic!("expected EventConflict, got {other:?}"),
    }
    assert_eq!(store.count_events().await.unwrap(), 3);
    let stored = store
        .customer_events("c1", base, base + Duration::hours(1))
        .await
        .unwrap();
    let mut ids: Vec<&str> = stored.iter().map(|e| e.id.as_str()).collect();
    ids.sort_unstable();
    assert_eq!(ids, ["evt_a", "evt_b", "evt_c"]);

    // Large batches are cut into chunks; replays of a large batch are all duplicates.
    let many: Vec<PreparedEvent> = (0..300)
        .map(|i| {
            let id = format!("bulk_{i:04}");
            let mut p = Ev::new("x", "c1", base + Duration::seconds(i)).prepared(&format!("h{i}"));
            p.event.id = EventId::parse(&id).unwrap();
            p
        })
        .collect();
    let out = store.insert_events(&many, rev).await.unwrap();
    assert_eq!((out.accepted, out.duplicates), (300, 0));
    let out = store.insert_events(&many, rev).await.unwrap();
    assert_eq!((out.accepted, out.duplicates), (0, 300));
    assert_eq!(store.count_events().await.unwrap(), 303);
}

async fn catalog_revisions_refuse_stale_costing(store: &dyn Store) {
    store
        .create_customer(&customer("c1", Currency::Usd, false))
        .await
        .unwrap();
    let (r0, versions) = store.load_catalog().await.unwrap();
    assert!(versions.is_empty());
    assert_eq!(store.catalog_revision().await.unwrap(), r0);

    let r1 = store
        .import_prices(&import("openai/gpt-4o", "2026-01-01T00:00:00Z", r0))
        .await
        .unwrap();
    assert_eq!(r1, r0 + 1);
    let (rev, versions) = store.load_catalog().await.unwrap();
    assert_eq!(rev, r1);
    assert_eq!(versions.len(), 1);
    let v = &versions[0];
    assert_eq!(
        (v.provider.as_str(), v.model.as_str()),
        ("openrouter", "openai/gpt-4o")
    );
    assert_eq!(v.effective_from, t("2026-01-01T00:00:00Z"));
    assert_eq!(v.prices, prices("0.0000025", "0.00001"));
    assert_eq!(
        store
            .versions_imported_since(t("2025-12-31T00:00:00Z"))
            .await
            .unwrap(),
        [v.id]
    );

    // An import planned against the old revision is refused and creates nothing.
    assert!(matches!(
        store
            .import_prices(&import("openai/gpt-4o-mini", "2026-01-01T00:00:00Z", r0))
            .await,
        Err(StoreError::CatalogChanged)
    ));
    assert_eq!(store.load_catalog().await.unwrap().1.len(), 1);
    // An empty plan at the current revision changes nothing.
    let mut empty = import("x", "2026-01-01T00:00:00Z", r1);
    empty.create.clear();
    assert_eq!(store.import_prices(&empty).await.unwrap(), r1);

    // Events costed against the old revision are refused, and nothing is written.
    let e = Ev::new("evt_1", "c1", t("2026-03-01T00:00:00Z")).priced(v.id, "0.0035", "0.0042");
    assert!(matches!(
        store.insert_events(&[e.prepared("h1")], r0).await,
        Err(StoreError::CatalogChanged)
    ));
    assert_eq!(store.count_events().await.unwrap(), 0);
    let out = store.insert_events(&[e.prepared("h1")], r1).await.unwrap();
    assert_eq!((out.accepted, out.unpriced), (1, 0));
    let stored = store
        .customer_events("c1", t("2026-03-01T00:00:00Z"), t("2026-03-02T00:00:00Z"))
        .await
        .unwrap();
    assert_eq!(stored.len(), 1);
    assert_eq!(stored[0].price_version_id, Some(v.id));
    assert_eq!(stored[0].cost, Some(d("0.0035")));
    assert_eq!(stored[0].revenue, Some(d("0.0042")));

    // A new version may not start before events already costed with another one.
    let err = store
        .import_prices(&import("openai/gpt-4o", "2026-02-01T00:00:00Z", r1))
        .await
        .unwrap_err();
    assert!(
        matches!(err, StoreError::Conflict(ref m) if m.contains("1 events")),
        "{err:?}"
    );
    assert_eq!(store.catalog_revision().await.unwrap(), r1);

    // Late pricing is refused against a stale revision too.
    let u = Ev::new("evt_2", "c1", t("2026-03-02T00:00:00Z"));
    store.insert_events(&[u.prepared("h2")], r1).await.unwrap();
    let pricing = vec![(
        "evt_2".to_string(),
        EventPricing {
            price_version_id: v.id,
            cost: d("0.001"),
            revenue: d("0.002"),
        },
    )];
    assert!(matches!(
        store.price_events(&pricing, r0).await,
        Err(StoreError::CatalogChanged)
    ));
    assert_eq!(store.unpriced_events("", 10).await.unwrap().len(), 1);
    assert_eq!(store.price_events(&pricing, r1).await.unwrap(), 1);
    assert_eq!(
        store.price_events(&pricing, r1).await.unwrap(),
        0,
        "priced events are skipped"
    );
    assert!(store.unpriced_events("", 10).await.unwrap().is_empty());
}

async fn pricing_changes_bump_the_revision_and_rates_are_history(store: &dyn Store) {
    store
        .create_customer(&customer("c1", Currency::Brl, false))
        .await
        .unwrap();
    let r0 = store.catalog_revision().await.unwrap();
    let day = chrono::NaiveDate::from_ymd_opt(2026, 3, 1).unwrap();
    let rate = FxRate {
        currency: Currency::Brl,
        date: day,
        rate: d("5.4321"),
        created_at: t("2026-03-01T00:00:00Z"),
    };
    let r1 = store
        .apply_pricing_change(&PricingChange::PutFxRate(rate.clone()))
        .await
        .unwrap();
    assert_eq!(r1, r0 + 1);
    // The same rate again is a no-op; another rate for the day is refused.
    let mut same = rate.clone();
    same.rate = d("5.43210");
    assert_eq!(
        store
            .apply_pricing_change(&PricingChange::PutFxRate(same))
            .await
            .unwrap(),
        r1
    );
    let mut other = rate.clone();
    other.rate = d("5.5");
    assert!(matches!(
        store
            .apply_pricing_change(&PricingChange::PutFxRate(other))
            .await,
        Err(StoreError::Conflict(_))
    ));
    let data = store.load_pricing().await.unwrap();
    assert_eq!(data.fx_rates, [rate]);
    assert_eq!(store.catalog_revision().await.unwrap(), r1);
}

async fn invoices_are_claimed_once_and_numbered_without_gaps(store: &dyn Store) {
    for id in ["c1", "c2"] {
        store
            .create_customer(&customer(id, Currency::Usd, false))
            .await
            .unwrap();
    }
    let rev = store.catalog_revision().await.unwrap();
    let evs = [
        Ev::new("e1", "c1", t("2026-03-03T00:00:00Z")).priced(1, "0.0035", "0.0042"),
        Ev::new("e2", "c1", t("2026-03-20T00:00:00Z")).priced(1, "0.0035", "0.0042"),
        Ev::new("e3", "c2", t("2026-03-21T00:00:00Z")).priced(1, "0.0035", "0.0042"),
        Ev::new("e4", "c1", t("2026-04-02T00:00:00Z")).priced(1, "0.0035", "0.0042"),
        // Unpriced: never linked to an invoice until a price import prices it.
        Ev::new("e5", "c1", t("2026-03-25T00:00:00Z")),
    ];
    // The priced events cite version 1: give the catalog one.
    let rev = store
        .import_prices(&import("openai/gpt-4o", "2025-01-01T00:00:00Z", rev))
        .await
        .unwrap();
    let prepared: Vec<_> = evs.iter().map(|e| e.prepared(e.id)).collect();
    store.insert_events(&prepared, rev).await.unwrap();

    // One live invoice per customer cycle.
    let draft = invoice("inv_c1_mar", "c1", 3, "12.34", 2);
    assert!(store.create_invoice(&draft).await.unwrap());
    assert!(
        !store
            .create_invoice(&invoice("inv_c1_mar_again", "c1", 3, "1.00", 2))
            .await
            .unwrap()
    );
    assert_eq!(store.get_invoice("inv_c1_mar_again").await.unwrap(), None);
    let before = t("2026-04-01T00:00:00Z");
    assert_eq!(
        store.uninvoiced_events("c1", before).await.unwrap().len(),
        3,
        "two priced events and the unpriced one"
    );

    let mut updated = draft.clone();
    updated.subtotal = d("20.00");
    updated.total = d("20.00");
    updated.amount_due = d("20.00");
    assert!(store.update_draft(&updated).await.unwrap());

    // Rated with a stale event count: nothing is written, the draft stays a draft.
    let mut stale = updated.clone();
    stale.events = 1;
    assert_eq!(
        store
            .finalize_invoice(&stale, "FAT-2026", None)
            .await
            .unwrap(),
        None
    );
    let still = store.get_invoice("inv_c1_mar").await.unwrap().unwrap();
    assert_eq!(
        (still.status.as_str(), still.number.as_deref()),
        ("draft", None)
    );
    assert_eq!(still.total, d("20.00"));

    let mut rated = updated.clone();
    rated.finalized_at = Some(t("2026-04-01T01:00:00Z"));
    rated.due_at = Some(t("2026-05-01T01:00:00Z"));
    let rebate = WalletTransaction {
        currency: Currency::Usd,
        kind: MovementKind::Granted,
        ..credit("wtx_rebate", "c1", "1.50", "2026-04-01T01:00:00Z")
    };
    let done = store
        .finalize_invoice(&rated, "FAT-2026", Some(&rebate))
        .await
        .unwrap()
        .expect("finalised");
    assert_eq!(done.number.as_deref(), Some("FAT-2026-000001"));
    assert_eq!(done.status, InvoiceStatus::Open);
    assert_eq!(done.total, d("20.00"));
    assert_eq!(done.finalized_at, Some(t("2026-04-01T01:00:00Z")));
    assert_eq!(done.due_at, Some(t("2026-05-01T01:00:00Z")));
    let left: Vec<String> = store
        .uninvoiced_events("c1", before)
        .await
        .unwrap()
        .into_iter()
        .map(|e| e.id)
        .collect();
    assert_eq!(left, ["e5"], "only the unpriced event stays unbilled");
    assert_eq!(
        store.wallet_transactions("c1").await.unwrap(),
        [rebate],
        "the rebate is recorded with the invoice"
    );

    // Finalising the same draft again does nothing: no second number, no change.
    assert!(matches!(
        store.finalize_invoice(&rated, "FAT-2026", None).await,
        Err(StoreError::Conflict(_))
    ));
    assert!(!store.update_draft(&rated).await.unwrap());
    assert_eq!(
        store.get_invoice("inv_c1_mar").await.unwrap(),
        Some(done.clone())
    );

    // The next invoice of the series takes the next number.
    let mut c2 = invoice("inv_c2_mar", "c2", 3, "3.00", 1);
    assert!(store.create_invoice(&c2).await.unwrap());
    c2.finalized_at = Some(t("2026-04-01T02:00:00Z"));
    let c2 = store
        .finalize_invoice(&c2, "FAT-2026", None)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(c2.number.as_deref(), Some("FAT-2026-000002"));
    // Another series starts at 1.
    let mut apr = invoice("inv_c1_apr", "c1", 4, "1.00", 1);
    assert!(store.create_invoice(&apr).await.unwrap());
    apr.finalized_at = Some(t("2026-05-01T00:00:00Z"));
    let apr = store
        .finalize_invoice(&apr, "FAT-2027", None)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(apr.number.as_deref(), Some("FAT-2027-000001"));

    let open: Vec<String> = store
        .list_invoices(Some("c1"), Some(InvoiceStatus::Open))
        .await
        .unwrap()
        .into_iter()
        .map(|i| i.id)
        .collect();
    assert_eq!(open, ["inv_c1_apr", "inv_c1_mar"], "newest period first");
    assert_eq!(store.list_invoices(None, None).await.unwrap().len(), 3);
    assert!(
        store
            .list_invoices(None, Some(InvoiceStatus::Paid))
            .await
            .unwrap()
            .is_empty()
    );

    // Paid: a payment recorded once; a paid invoice cannot be voided.
    let paid = store
        .record_payment(
            "inv_c2_mar",
            Some("pi_1"),
            Some(t("2026-04-05T00:00:00Z")),
            None,
        )
        .await
        .unwrap()
        .unwrap();
    assert_eq!(paid.status, InvoiceStatus::Paid);
    assert_eq!(paid.payment_reference.as_deref(), Some("pi_1"));
    assert!(matches!(
        store
            .void_invoice("inv_c2_mar", t("2026-04-06T00:00:00Z"))
            .await,
        Err(StoreError::Conflict(_))
    ));
    // Voiding an unpaid invoice releases its events for a reissue; its number stays.
    let void = store
        .void_invoice("inv_c1_mar", t("2026-04-06T00:00:00Z"))
        .await
        .unwrap();
    assert_eq!(void.status, InvoiceStatus::Void);
    assert_eq!(void.number.as_deref(), Some("FAT-2026-000001"));
    assert_eq!(
        store.uninvoiced_events("c1", before).await.unwrap().len(),
        3
    );
    assert!(
        store
            .create_invoice(&invoice("inv_c1_mar_2", "c1", 3, "20.00", 2))
            .await
            .unwrap(),
        "a voided cycle can be invoiced again"
    );
}

async fn credit_notes_are_capped_at_the_invoice_total(store: &dyn Store) {
    store
        .create_customer(&customer("c1", Currency::Usd, false))
        .await
        .unwrap();
    let mut inv = invoice("inv_1", "c1", 3, "10.00", 0);
    assert!(store.create_invoice(&inv).await.unwrap());

    // A draft is not corrected with credit notes.
    assert!(matches!(
        store
            .issue_credit_note(&credit_note("cn_0", &inv, "1.00"), "FAT-CN-2026")
            .await,
        Err(StoreError::Conflict(_))
    ));
    inv.finalized_at = Some(t("2026-04-01T00:00:00Z"));
    let inv = store
        .finalize_invoice(&inv, "FAT-2026", None)
        .await
        .unwrap()
        .unwrap();

    let first = store
        .issue_credit_note(&credit_note("cn_1", &inv, "4.00"), "FAT-CN-2026")
        .await
        .unwrap();
    assert_eq!(first.number.as_deref(), Some("FAT-CN-2026-000001"));
    assert_eq!(first.kind, InvoiceKind::CreditNote);
    assert_eq!(first.corrects_invoice_id.as_deref(), Some("inv_1"));
    assert_eq!(first.total, d("4.00"));
    // Up to the total exactly…
    let second = store
        .issue_credit_note(&credit_note("cn_2", &inv, "6.00"), "FAT-CN-2026")
        .await
        .unwrap();
    assert_eq!(second.number.as_deref(), Some("FAT-CN-2026-000002"));
    // …and not a cent more; the refused note takes no number.
    let err = store
        .issue_credit_note(&credit_note("cn_3", &inv, "0.01"), "FAT-CN-2026")
        .await
        .unwrap_err();
    assert!(
        matches!(err, StoreError::Conflict(ref m) if m.contains("10.00 already credited of 10.00")),
        "{err:?}"
    );
    assert_eq!(store.get_invoice("cn_3").await.unwrap(), None);
    assert!(matches!(
        store
            .issue_credit_note(
                &InvoiceRecord {
                    corrects_invoice_id: Some("inv_none".into()),
                    ..credit_note("cn_4", &inv, "1.00")
                },
                "FAT-CN-2026"
            )
            .await,
        Err(StoreError::Conflict(_))
    ));
    assert!(matches!(
        store
            .issue_credit_note(
                &InvoiceRecord {
                    corrects_invoice_id: None,
                    ..credit_note("cn_5", &inv, "1.00")
                },
                "FAT-CN-2026"
            )
            .await,
        Err(StoreError::Conflict(_))
    ));
    // A credit note is not itself corrected, nor voided.
    assert!(matches!(
        store
            .issue_credit_note(&credit_note("cn_6", &first, "1.00"), "FAT-CN-2026")
            .await,
        Err(StoreError::Conflict(_))
    ));
    assert!(matches!(
        store.void_invoice("cn_1", t("2026-04-11T00:00:00Z")).await,
        Err(StoreError::Conflict(_))
    ));
    let notes: Vec<(String, Option<String>)> = store
        .list_invoices(Some("c1"), None)
        .await
        .unwrap()
        .into_iter()
        .filter(|i| i.kind == InvoiceKind::CreditNote)
        .map(|i| (i.id, i.number))
        .collect();
    assert_eq!(notes.len(), 2);
    let next = store
        .issue_credit_note(&credit_note("cn_other", &inv, "0.00"), "FAT-CN-2026")
        .await
        .unwrap();
    assert_eq!(
        next.number.as_deref(),
        Some("FAT-CN-2026-000003"),
        "no number was lost to the refused notes"
    );
}

async fn wallet_movements_add_up_and_page(store: &dyn Store) {
    store
        .create_customer(&customer("w1", Currency::Brl, true))
        .await
        .unwrap();
    store
        .create_customer(&customer("w2", Currency::Brl, true))
        .await
        .unwrap();
    let c1 = credit("wtx_1", "w1", "50.00", "2026-03-01T00:00:00Z");
    let mut c2 = credit("wtx_2", "w1", "10.00", "2026-03-01T00:00:00Z");
    c2.kind = MovementKind::Granted;
    c2.expires_at = Some(t("2026-12-31T00:00:00Z"));
    store.add_wallet_credit(&c1).await.unwrap();
    store.add_wallet_credit(&c2).await.unwrap();
    store
        .add_wallet_credit(&credit("wtx_other", "w2", "5.00", "2026-03-01T00:00:00Z"))
        .await
        .unwrap();

    let rev = store.catalog_revision().await.unwrap();
    let e1 = Ev::new("call_1", "w1", t("2026-03-02T00:00:00Z")).charge("1.25");
    let e2 = Ev::new("call_2", "w1", t("2026-03-03T00:00:00Z")).charge("0.755");
    let e3 = Ev::new("call_3", "w1", t("2026-03-04T00:00:00Z"));
    store
        .insert_events(&[e1.prepared("1"), e2.prepared("2"), e3.prepared("3")], rev)
        .await
        .unwrap();
    // A replay is not charged again.
    let replay = store.insert_events(&[e1.prepared("1")], rev).await.unwrap();
    assert_eq!(replay.duplicates, 1);

    let txs = store.wallet_transactions("w1").await.unwrap();
    let summary: Vec<(&str, &str, String, Option<&str>)> = txs
        .iter()
        .map(|x| {
            (
                x.id.as_str(),
                x.kind.as_str(),
                x.amount.to_string(),
                x.event_id.as_deref(),
            )
        })
        .collect();
    assert_eq!(
        summary,
        [
            ("wtx_1", "purchased", "50.00".to_string(), None),
            ("wtx_2", "granted", "10.00".to_string(), None),
            (
                "charge:call_1",
                "charge",
                "-1.25".to_string(),
                Some("call_1")
            ),
            (
                "charge:call_2",
                "charge",
                "-0.755".to_string(),
                Some("call_2")
            ),
        ]
    );
    assert!(txs.iter().all(|x| x.currency == Currency::Brl));
    assert_eq!(txs[1].expires_at, Some(t("2026-12-31T00:00:00Z")));
    assert_eq!(txs[2].created_at, t("2026-03-02T00:00:01Z"));
    let credits: Decimal = txs
        .iter()
        .filter(|x| x.kind != MovementKind::Charge)
        .map(|x| x.amount)
        .sum();
    let charges: Decimal = txs
        .iter()
        .filter(|x| x.kind == MovementKind::Charge)
        .map(|x| -x.amount)
        .sum();
    assert_eq!(credits, d("60"));
    assert_eq!(charges, d("2.005"));
    assert_eq!(credits - charges, d("57.995"));

    // Paging: oldest first, after a movement of this wallet only.
    let page1 = store
        .wallet_transactions_page("w1", None, 3)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(page1, txs[..3]);
    let page2 = store
        .wallet_transactions_page("w1", Some(&page1[2].id), 3)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(page2, txs[3..]);
    let end = store
        .wallet_transactions_page("w1", Some(&page2[0].id), 3)
        .await
        .unwrap()
        .unwrap();
    assert!(end.is_empty());
    assert_eq!(
        store
            .wallet_transactions_page("w1", Some("wtx_other"), 3)
            .await
            .unwrap(),
        None,
        "another wallet's movement is not a cursor"
    );
    assert_eq!(
        store
            .wallet_transactions_page("w1", Some("wtx_nope"), 3)
            .await
            .unwrap(),
        None
    );
    assert_eq!(store.wallet_transactions("w2").await.unwrap().len(), 1);
}

/// The rows `query_rollups(grain, …, None, Dims::ALL)` must return, from a recount: every
/// customer's rows.
fn customer_rows(delta: &RollupDelta, grain: Grain) -> Vec<(RollupKey, RollupTotals)> {
    let mut rows: Vec<_> = delta
        .iter()
        .filter(|(k, _)| k.grain == grain && k.customer_id != FLEET)
        .map(|(k, t)| (k.clone(), *t))
        .collect();
    rows.sort_by(|a, b| a.0.cmp(&b.0));
    rows
}

/// The fleet rows of a recount summed over agents (what the fleet query keeps).
fn fleet_rows(delta: &RollupDelta, grain: Grain) -> Vec<(RollupKey, RollupTotals)> {
    let mut sums: BTreeMap<RollupKey, RollupTotals> = BTreeMap::new();
    for (k, t) in delta
        .iter()
        .filter(|(k, _)| k.grain == grain && k.customer_id == FLEET)
    {
        let key = RollupKey {
            agent: String::new(),
            ..k.clone()
        };
        let s = sums.entry(key).or_default();
        s.events += t.events;
        s.requests += t.requests;
        s.input_tokens += t.input_tokens;
        s.output_tokens += t.output_tokens;
        s.cached_input_tokens += t.cached_input_tokens;
        s.cache_write_tokens += t.cache_write_tokens;
        s.reasoning_tokens += t.reasoning_tokens;
        s.unpriced_events += t.unpriced_events;
        s.cost += t.cost;
        s.revenue += t.revenue;
    }
    sums.into_iter().map(|(k, t)| (k, normalized(t))).collect()
}

fn normalized(mut t: RollupTotals) -> RollupTotals {
    t.cost = t.cost.normalize();
    t.revenue = t.revenue.normalize();
    t
}

async fn sorted_query(
    store: &dyn Store,
    grain: Grain,
    customer: Option<&str>,
    by: Dims,
) -> Vec<(RollupKey, RollupTotals)> {
    let mut rows = store
        .query_rollups(
            grain,
            t("2000-01-01T00:00:00Z"),
            t("2100-01-01T00:00:00Z"),
            customer,
            by,
        )
        .await
        .unwrap();
    for r in &mut rows {
        r.1 = normalized(r.1);
    }
    rows.sort_by(|a, b| a.0.cmp(&b.0));
    rows
}

async fn rollups_equal_a_recount(store: &dyn Store) {
    for id in ["r1", "r2"] {
        store
            .create_customer(&customer(id, Currency::Usd, false))
            .await
            .unwrap();
    }
    let rev = store.catalog_revision().await.unwrap();
    // Recent events land in minute rows too.
    let recent = Utc::now().trunc_subsecs(0) - Duration::minutes(5);
    let old = t("2026-02-10T10:15:00Z");
    let events = [
        Ev::new("a1", "r1", old)
            .priced(1, "0.000000000000000001", "0.25")
            .agent("sdr-bot"),
        Ev::new("a2", "r1", old + Duration::minutes(1))
            .priced(1, "1.5", "2.25")
            .agent("sdr-bot"),
        Ev::new("a3", "r1", old + Duration::hours(30)).priced(1, "0.123456789123456789", "0.2"),
        Ev::new("a4", "r2", old)
            .model("anthropic/claude")
            .tokens(5, 7),
        Ev::new("a5", "r2", recent)
            .priced(1, "0.01", "0.02")
            .agent("support"),
        Ev::new("a6", "r2", recent + Duration::seconds(30)).tokens(11, 13),
    ];
    // The priced events cite version 1: give the catalog one.
    let r1 = store
        .import_prices(&import("openai/gpt-4o", "2025-01-01T00:00:00Z", rev))
        .await
        .unwrap();
    let prepared: Vec<_> = events.iter().map(|e| e.prepared(e.id)).collect();
    store.insert_events(&prepared[..4], r1).await.unwrap();
    // Replays (duplicates) and a new batch overlapping the first.
    let out = store.insert_events(&prepared[2..], r1).await.unwrap();
    assert_eq!((out.accepted, out.duplicates), (2, 2));
    store.insert_events(&prepared, r1).await.unwrap();

    let unpriced = store.unpriced_models(None).await.unwrap();
    let summary: Vec<(&str, u64, u64, u64)> = unpriced
        .iter()
        .map(|m| (m.model.as_str(), m.events, m.input_tokens, m.output_tokens))
        .collect();
    assert_eq!(
        summary,
        [("anthropic/claude", 1, 5, 7), ("openai/gpt-4o", 1, 11, 13)]
    );
    assert_eq!(store.unpriced_models(Some("r1")).await.unwrap(), []);

    // Late pricing of one unpriced event.
    let late = vec![(
        "a4".to_string(),
        EventPricing {
            price_version_id: 1,
            cost: d("0.333"),
            revenue: d("0.5"),
        },
    )];
    assert_eq!(store.price_events(&late, r1).await.unwrap(), 1);

    let recount = store.recount_rollups().await.unwrap();
    for grain in Grain::ALL {
        assert_eq!(
            sorted_query(store, grain, None, Dims::ALL).await,
            customer_rows(&recount, grain),
            "{grain:?}: customer rows"
        );
        let fleet_dims = Dims {
            customer: false,
            agent: false,
            ..Dims::ALL
        };
        assert_eq!(
            sorted_query(store, grain, None, fleet_dims).await,
            fleet_rows(&recount, grain),
            "{grain:?}: fleet rows"
        );
    }

    // And the figures themselves: r1's February, summed in the database.
    let month = sorted_query(
        store,
        Grain::Month,
        Some("r1"),
        Dims {
            bucket: true,
            customer: true,
            provider: false,
            model: false,
            agent: false,
        },
    )
    .await;
    assert_eq!(month.len(), 1);
    let (key, totals) = &month[0];
    assert_eq!(key.bucket, t("2026-02-01T00:00:00Z"));
    assert_eq!(
        (totals.events, totals.requests, totals.unpriced_events),
        (3, 3, 0)
    );
    assert_eq!((totals.input_tokens, totals.output_tokens), (3000, 300));
    assert_eq!(totals.cost, d("1.623456789123456790"));
    assert_eq!(totals.revenue, d("2.7"));
    let r2_month = sorted_query(
        store,
        Grain::Month,
        Some("r2"),
        Dims {
            bucket: false,
            customer: true,
            provider: false,
            model: false,
            agent: false,
        },
    )
    .await;
    assert_eq!(r2_month.len(), 1);
    let totals = r2_month[0].1;
    assert_eq!((totals.events, totals.unpriced_events), (3, 1));
    assert_eq!((totals.cost, totals.revenue), (d("0.343"), d("0.52")));
    let minutes = sorted_query(store, Grain::Minute, Some("r2"), Dims::ALL).await;
    assert_eq!(minutes.iter().map(|r| r.1.events).sum::<i64>(), 2);
    assert!(minutes.iter().any(|r| r.0.agent == "support"));
    let minute_rows = recount.keys().filter(|k| k.grain == Grain::Minute).count();
    assert!(minute_rows >= 2, "r2's and the fleet's minute rows");
    assert_eq!(
        store
            .prune_minute_rollups(Utc::now() + Duration::hours(1))
            .await
            .unwrap(),
        minute_rows as u64
    );
    assert!(
        sorted_query(store, Grain::Minute, Some("r2"), Dims::ALL)
            .await
            .is_empty()
    );
}

async fn usage_queries_filter_by_tags_and_page(store: &dyn Store) {
    for id in ["u1", "u2"] {
        store
            .create_customer(&customer(id, Currency::Usd, false))
            .await
            .unwrap();
    }
    let rev = store.catalog_revision().await.unwrap();
    let base = t("2026-03-05T00:00:00Z");
    let evs = [
        Ev::new("x1", "u1", base).agent("sdr-bot"),
        Ev::new("x2", "u1", base + Duration::seconds(1)),
        Ev::new("x3", "u2", base + Duration::seconds(1)).agent("sdr-bot"),
        Ev::new("x4", "u2", base + Duration::seconds(2)).agent("other"),
    ];
    let prepared: Vec<_> = evs.iter().map(|e| e.prepared(e.id)).collect();
    store.insert_events(&prepared, rev).await.unwrap();

    let filter = UsageFilter {
        tags: vec![("agent".into(), "sdr-bot".into())],
        ..UsageFilter::default()
    };
    let rows = store.usage_page(&filter, None, 10).await.unwrap();
    assert_eq!(
        rows.iter().map(|r| r.id.as_str()).collect::<Vec<_>>(),
        ["x1", "x3"]
    );
    let tags: BTreeMap<String, String> = serde_json::from_str(&rows[1].tags).unwrap();
    assert_eq!(tags, prepared[2].event.tags);
    // A tag name with a dot is one name, not a path.
    let dotted = UsageFilter {
        tags: vec![("team.name".into(), "team-u2".into())],
        ..UsageFilter::default()
    };
    let rows = store.usage_page(&dotted, None, 10).await.unwrap();
    assert_eq!(
        rows.iter().map(|r| r.id.as_str()).collect::<Vec<_>>(),
        ["x3", "x4"]
    );

    // Keyset pages in (timestamp, id) order.
    let all = UsageFilter::default();
    let p1 = store.usage_page(&all, None, 2).await.unwrap();
    assert_eq!(
        p1.iter().map(|r| r.id.as_str()).collect::<Vec<_>>(),
        ["x1", "x2"]
    );
    let last = p1.last().unwrap();
    let p2 = store
        .usage_page(&all, Some((last.timestamp, last.id.clone())), 2)
        .await
        .unwrap();
    assert_eq!(
        p2.iter().map(|r| r.id.as_str()).collect::<Vec<_>>(),
        ["x3", "x4"]
    );
    assert_eq!(p2[0].usage, TokenUsage::new(1000, 100, 0, 0, 0, 1).unwrap());

    // Aggregation: u2 from `base` until (not including) x4's second: x3 alone.
    let mut agg = fatura_core::usage::UsageAggregator::new(vec![GroupBy::Customer]);
    let u2 = UsageFilter {
        customer_id: Some("u2".into()),
        from: Some(base),
        to: Some(base + Duration::seconds(2)),
        ..UsageFilter::default()
    };
    store.aggregate_usage(&u2, &mut agg).await.unwrap();
    let groups = agg.finish();
    assert_eq!(groups.len(), 1);
    assert_eq!(groups[0].0.customer_id.as_deref(), Some("u2"));
    let totals = &groups[0].1;
    assert_eq!(
        (
            totals.events,
            totals.unpriced_events,
            totals.input_tokens,
            totals.output_tokens
        ),
        (1, 1, 1000, 100)
    );
    let mut agg = fatura_core::usage::UsageAggregator::new(vec![]);
    store.aggregate_usage(&filter, &mut agg).await.unwrap();
    assert_eq!(
        agg.finish()[0].1.events,
        2,
        "the tag filter applies to aggregation"
    );
}

async fn alerts_outcomes_payments_and_leases(store: &dyn Store) {
    store
        .create_customer(&customer("p1", Currency::Usd, false))
        .await
        .unwrap();
    // Alerts: deduplicated, last seen is the latest.
    let alert = AlertRecord {
        id: "alr_1".into(),
        dedupe_key: "floor:p1".into(),
        kind: "floor_applied".into(),
        severity: "warning".into(),
        customer_id: Some("p1".into()),
        plan_id: None,
        provider: None,
        model: None,
        reason: None,
        message: "first".into(),
        first_seen: t("2026-03-01T00:00:00Z"),
        last_seen: t("2026-03-02T00:00:00Z"),
        occurrences: 1,
    };
    store.raise_alert(&alert).await.unwrap();
    store
        .raise_alert(&AlertRecord {
            id: "alr_2".into(),
            message: "second".into(),
            last_seen: t("2026-03-01T12:00:00Z"),
            ..alert.clone()
        })
        .await
        .unwrap();
    let alerts = store.list_alerts().await.unwrap();
    assert_eq!(alerts.len(), 1);
    assert_eq!(alerts[0].id, "alr_1");
    assert_eq!(alerts[0].occurrences, 2);
    assert_eq!(alerts[0].message, "second");
    assert_eq!(alerts[0].last_seen, t("2026-03-02T00:00:00Z"));

    // Outcomes: idempotent by id, conflicts write nothing.
    let o = fatura_store::OutcomeRecord {
        id: "out_1".into(),
        content_hash: "h1".into(),
        customer_id: "p1".into(),
        timestamp: t("2026-03-01T00:00:00Z"),
        agent: "sdr-bot".into(),
        kind: "conversion".into(),
        value: d("250"),
        currency: Currency::Usd,
        tags: "{}".into(),
        created_at: t("2026-03-01T00:00:01Z"),
    };
    assert_eq!(
        store
            .insert_outcomes(std::slice::from_ref(&o))
            .await
            .unwrap(),
        (1, 0)
    );
    let o2 = fatura_store::OutcomeRecord {
        id: "out_2".into(),
        ..o.clone()
    };
    assert_eq!(
        store
            .insert_outcomes(&[o.clone(), o2.clone()])
            .await
            .unwrap(),
        (1, 1)
    );
    let changed = fatura_store::OutcomeRecord {
        content_hash: "other".into(),
        ..o.clone()
    };
    let o3 = fatura_store::OutcomeRecord {
        id: "out_3".into(),
        ..o.clone()
    };
    assert!(matches!(
        store.insert_outcomes(&[o3, changed]).await,
        Err(StoreError::EventConflict { id }) if id == "out_1"
    ));
    let got = store
        .query_outcomes(
            t("2026-01-01T00:00:00Z"),
            t("2027-01-01T00:00:00Z"),
            Some("p1"),
        )
        .await
        .unwrap();
    assert_eq!(got, [o, o2]);
    assert!(
        store
            .query_outcomes(
                t("2026-01-01T00:00:00Z"),
                t("2027-01-01T00:00:00Z"),
                Some("px")
            )
            .await
            .unwrap()
            .is_empty()
    );

    // Payments: inserted once, settled once, pushed again by one claimant.
    let p = fatura_store::PaymentRecord {
        id: "fatura-topup-1".into(),
        customer_id: "p1".into(),
        invoice_id: None,
        kind: PaymentKind::TopUp,
        amount: d("25.50"),
        currency: Currency::Usd,
        status: PaymentStatus::Pending,
        reference: None,
        error: None,
        created_at: t("2026-03-01T00:00:00Z"),
        updated_at: t("2026-03-01T00:00:00Z"),
    };
    assert!(store.insert_payment(&p).await.unwrap());
    assert!(!store.insert_payment(&p).await.unwrap());
    let now = t("2026-03-01T00:05:00Z");
    assert!(
        store
            .claim_payment_push(&p.id, p.updated_at, now)
            .await
            .unwrap()
    );
    assert!(
        !store
            .claim_payment_push(&p.id, p.updated_at, now)
            .await
            .unwrap()
    );
    let (settled, changed) = store
        .settle_payment(&p.id, PaymentStatus::Succeeded, Some("pi_9"), None, now)
        .await
        .unwrap()
        .unwrap();
    assert!(changed);
    assert_eq!(
        (
            settled.status.as_str(),
            settled.reference.as_deref(),
            settled.amount
        ),
        ("succeeded", Some("pi_9"), d("25.50"))
    );
    let (_, changed) = store
        .settle_payment(&p.id, PaymentStatus::Failed, None, Some("late"), now)
        .await
        .unwrap()
        .unwrap();
    assert!(!changed, "a settled payment keeps its status");
    assert_eq!(
        store.get_payment(&p.id).await.unwrap().unwrap().status,
        PaymentStatus::Succeeded
    );
    assert_eq!(store.list_payments("p1", None).await.unwrap().len(), 1);
    assert!(
        store
            .list_payments("p1", Some("inv_x"))
            .await
            .unwrap()
            .is_empty()
    );
    assert_eq!(
        store
            .settle_payment("nope", PaymentStatus::Failed, None, None, now)
            .await
            .unwrap(),
        None
    );

    // Leases: one holder at a time until it runs out.
    let t0 = t("2026-03-01T00:00:00Z");
    assert!(
        store
            .acquire_lease("rate", "a", t0, t0 + Duration::seconds(30))
            .await
            .unwrap()
    );
    assert!(
        !store
            .acquire_lease("rate", "b", t0, t0 + Duration::seconds(30))
            .await
            .unwrap()
    );
    assert!(
        store
            .acquire_lease("rate", "a", t0, t0 + Duration::seconds(60))
            .await
            .unwrap()
    );
    let later = t0 + Duration::seconds(61);
    assert!(
        store
            .acquire_lease("rate", "b", later, later + Duration::seconds(30))
            .await
            .unwrap()
    );
    store.release_lease("rate", "b").await.unwrap();
    assert!(
        store
            .acquire_lease("rate", "a", later, later + Duration::seconds(30))
            .await
            .unwrap()
    );

    // Webhooks: each id once.
    assert!(
        store
            .record_webhook("evt_1", "payment_intent.succeeded", t0)
            .await
            .unwrap()
    );
    assert!(
        !store
            .record_webhook("evt_1", "payment_intent.succeeded", t0)
            .await
            .unwrap()
    );

    // API keys: found while active.
    let key = fatura_store::ApiKeyRecord {
        id: "key_1".into(),
        customer_id: "p1".into(),
        key_hash: "ab".repeat(32),
        prefix: "fk_live_ab".into(),
        created_at: t0,
        revoked_at: None,
    };
    store.create_api_key(&key).await.unwrap();
    assert_eq!(
        store.find_active_api_key(&key.key_hash).await.unwrap(),
        Some(key.clone())
    );
    assert!(store.revoke_api_key("key_1", later).await.unwrap());
    assert!(!store.revoke_api_key("key_1", later).await.unwrap());
    assert_eq!(
        store.find_active_api_key(&key.key_hash).await.unwrap(),
        None
    );
    assert_eq!(
        store.list_api_keys("p1").await.unwrap()[0].revoked_at,
        Some(later)
    );
    store.ping().await.unwrap();
}
