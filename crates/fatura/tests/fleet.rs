//! Several instances on one PostgreSQL: the live feed of every instance shows the calls
//! recorded by all of them (PostgreSQL NOTIFY from the inserting transaction, relayed into
//! each process's feed), each exactly once; and three real processes, one killed with
//! SIGKILL under load, lose, double and overspend nothing.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::serve::{ServeProcess, admin_post, free_port, gateway_config, mock_upstream};
use common::{ADMIN_KEY, Backend, TestApp, catalog, event};
use fatura_server::service::{Fatura, LiveCall};
use reqwest::StatusCode;
use serde_json::{Value, json};
use tokio::sync::broadcast::Receiver;

/// A second instance on the app's database: its own pool, its own server.
async fn second_instance(app: &TestApp) -> String {
    let store = fatura_store::connect(&app.database_url, 4).await.unwrap();
    let fatura = Arc::new(Fatura::new(store, fatura_core::MarginRate::default_floor()));
    let state = fatura_server::AppState::new(fatura, ADMIN_KEY);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move {
        fatura_server::serve(listener, state, std::future::pending())
            .await
            .unwrap();
    });
    base
}

async fn post_event(base: &str, id: &str) {
    let r = reqwest::Client::new()
        .post(format!("{base}/v1/events"))
        .bearer_auth(ADMIN_KEY)
        .json(&json!({"events": [event(id, "acme", json!({"tags": {"agent": "bot"}}))]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
}

/// The ids received on `rx` until `last` arrives (or the deadline passes: `None`).
async fn until_seen(
    rx: &mut Receiver<LiveCall>,
    last: &str,
    within: Duration,
) -> Option<Vec<LiveCall>> {
    let started = Instant::now();
    let mut seen = Vec::new();
    while let Some(left) = within.checked_sub(started.elapsed()) {
        match tokio::time::timeout(left, rx.recv()).await {
            Ok(Ok(c)) => {
                let done = c.id == last;
                seen.push(c);
                if done {
                    return Some(seen);
                }
            }
            Ok(Err(e)) => panic!("live feed: {e}"),
            Err(_) => return None,
        }
    }
    None
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_instance_sees_every_call_once() {
    let app = TestApp::start(Backend::Postgres).await;
    catalog(
        &app,
        "2026-01-01T00:00:00Z",
        &[("openai/gpt-4o", "0.0000025", "0.00001")],
    )
    .await;
    app.customer("acme").await;
    let b = second_instance(&app).await;
    let mut rx = app.fatura.subscribe_live();
    // The relays connect in the background: probe through B until A's feed shows it.
    let started = Instant::now();
    let mut n = 0;
    loop {
        n += 1;
        let probe = format!("probe-{n}");
        post_event(&b, &probe).await;
        if until_seen(&mut rx, &probe, Duration::from_millis(300))
            .await
            .is_some()
        {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "A never saw B's calls"
        );
    }
    // A call recorded by A itself, then one by B: A's feed has A's call exactly once (not
    // published locally and again by the relay), priced, and B's after it.
    post_event(&app.base, "from-a").await;
    post_event(&b, "from-b").await;
    let seen = until_seen(&mut rx, "from-b", Duration::from_secs(10))
        .await
        .expect("B's call reached A's feed");
    let mine: Vec<&LiveCall> = seen.iter().filter(|c| c.id == "from-a").collect();
    assert_eq!(mine.len(), 1, "{seen:?}");
    assert_eq!(mine[0].customer_id, "acme");
    assert_eq!(mine[0].agent.as_deref(), Some("bot"));
    // 1,000 in + 100 out of gpt-4o: 0.0025 + 0.001 = 0.0035 USD, at 87% margin.
    assert_eq!(mine[0].cost, Some("0.0035".parse().unwrap()));
    assert_eq!(mine[0].margin(), Some("0.87".parse().unwrap()));
    // A replay is not a new call: nothing is published for it.
    post_event(&b, "from-b").await;
    post_event(&b, "marker").await;
    let seen = until_seen(&mut rx, "marker", Duration::from_secs(10))
        .await
        .unwrap();
    assert!(seen.iter().all(|c| c.id != "from-b"), "{seen:?}");
}

/// Instance `n` of the fleet: synchronous metering (an answered call is committed), the
/// scheduler every second, Stripe at `stripe`, and `gateway_extra` in `[gateway]`.
async fn spawn_instance(
    dir: &std::path::Path,
    n: usize,
    database_url: &str,
    mock: &str,
    stripe: &str,
    gateway_extra: &str,
) -> ServeProcess {
    let spill = dir.join(format!("spill-{n}.jsonl"));
    let config = gateway_config(
        mock,
        &format!(
            "durability = \"sync\"\nspill_path = \"{}\"\n{gateway_extra}",
            spill.display()
        ),
        "[billing]\nrun_every_seconds = 1\npayment_retry_seconds = 0",
    );
    ServeProcess::start(
        dir,
        &format!("instance-{n}"),
        free_port(),
        database_url,
        &config,
        &[
            ("FATURA_STRIPE_API_KEY", common::stripe::STRIPE_KEY),
            (
                "FATURA_STRIPE_WEBHOOK_SECRET",
                common::stripe::WEBHOOK_SECRET,
            ),
            ("FATURA_STRIPE_API_BASE", stripe),
        ],
    )
    .await
}

/// What the load saw acknowledged.
#[derive(Default)]
struct Acked {
    /// Ingested event ids answered 200.
    ingested: Vec<String>,
    /// Gateway request ids answered 200, by customer.
    calls: Vec<(String, String)>,
    /// Prepaid calls refused with 402.
    refused: u64,
    /// Requests that got no answer (their instance was killed).
    lost_answers: u64,
}

/// Three `fatura serve` processes on one PostgreSQL database, a mock upstream and
/// localstripe: concurrent gateway calls (one prepaid wallet shared by all) and event
/// ingestion through all three; one instance is killed with SIGKILL in the middle. Then:
/// every acknowledged event is in the ledger exactly once, the wallet's charges never exceed
/// its credits, each customer cycle has exactly one invoice, and each invoice is charged
/// exactly once in localstripe — with the billing run started on the two survivors at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_processes_one_killed_lose_nothing_double_nothing_overspend_nothing() {
    use common::stripe::{card, localstripe, stripe_get, stripe_post};
    use std::sync::Mutex;
    use std::sync::atomic::{AtomicBool, Ordering};

    let app = TestApp::start(Backend::Postgres).await;
    let ls = localstripe().await;
    let mock = mock_upstream().await;
    let dir = tempfile::tempdir().unwrap();
    let mut fleet = Vec::new();
    for n in 0..3 {
        fleet.push(spawn_instance(dir.path(), n, &app.database_url, &mock, &ls.base, "").await);
    }
    let bases: Vec<String> = fleet.iter().map(|i| i.base.clone()).collect();
    let client = reqwest::Client::new();
    let b0 = &bases[0];
    // Webhooks of localstripe go to instance 1 (a survivor).
    stripe_post(
        &ls,
        "/_config/webhooks/fatura",
        &[
            ("url", &format!("{}/v1/webhooks/stripe", bases[1])),
            ("secret", common::stripe::WEBHOOK_SECRET),
        ],
    )
    .await;
    catalog(
        &app,
        "2026-01-01T00:00:00Z",
        &[("openai/gpt-4o", "0.0000025", "0.00001")],
    )
    .await;
    // "wallet" is prepaid with 0.05 USD: about 28 calls at ~0.0017 (87% margin); three
    // postpaid customers pay by card.
    admin_post(
        b0,
        "/v1/customers",
        json!({"id": "wallet", "name": "Wallet", "billing_mode": "prepaid"}),
    )
    .await;
    admin_post(
        b0,
        "/v1/customers/wallet/wallet/credits",
        json!({"amount": "0.05", "currency": "USD", "kind": "purchased"}),
    )
    .await;
    // "limited" is postpaid with a monthly spend limit of 0.03 USD (about 17 calls).
    admin_post(
        b0,
        "/v1/customers",
        json!({"id": "limited", "name": "Limited", "monthly_spend_limit": "0.03"}),
    )
    .await;
    let mut keys = std::collections::HashMap::new();
    keys.insert(
        "limited".to_string(),
        admin_post(b0, "/v1/customers/limited/keys", json!({})).await["key"]
            .as_str()
            .unwrap()
            .to_string(),
    );
    for c in ["wallet", "p0", "p1", "p2"] {
        if c != "wallet" {
            admin_post(b0, "/v1/customers", json!({"id": c, "name": c})).await;
            let pm = card(&ls, "4242424242424242").await;
            admin_post(
                b0,
                &format!("/v1/customers/{c}/payment-methods"),
                json!({"payment_method": pm}),
            )
            .await;
        }
        let k = admin_post(b0, &format!("/v1/customers/{c}/keys"), json!({})).await;
        keys.insert(c.to_string(), k["key"].as_str().unwrap().to_string());
    }

    // The load: 9 workers, 3 per instance, until `stop`; a worker whose instance is gone
    // moves on to the next one.
    let stop = Arc::new(AtomicBool::new(false));
    let acked = Arc::new(Mutex::new(Acked::default()));
    let dead = Arc::new(Mutex::new(None::<usize>));
    let mut workers = Vec::new();
    for w in 0..9usize {
        let (stop, acked, dead, bases, keys) = (
            stop.clone(),
            acked.clone(),
            dead.clone(),
            bases.clone(),
            keys.clone(),
        );
        workers.push(tokio::spawn(async move {
            let client = reqwest::Client::builder()
                .timeout(Duration::from_secs(20))
                .build()
                .unwrap();
            let postpaid = format!("p{}", w % 3);
            let now = chrono::Utc::now().to_rfc3339();
            let mut n = 0;
            while !stop.load(Ordering::Relaxed) {
                n += 1;
                let mut target = (w + n) % 3;
                if *dead.lock().unwrap() == Some(target) {
                    target = (target + 1) % 3;
                }
                let base = &bases[target];
                for customer in ["wallet", "limited", postpaid.as_str()] {
                    let r = client
                        .post(format!("{base}/v1/chat/completions"))
                        .bearer_auth(&keys[customer])
                        .json(&json!({"model": "openai/gpt-4o", "max_tokens": 20,
                                      "messages": [{"role": "user", "content": "hello there"}]}))
                        .send()
                        .await;
                    let mut a = match r {
                        Ok(r) => {
                            let status = r.status();
                            let id = r
                                .headers()
                                .get("x-fatura-request-id")
                                .map(|v| v.to_str().unwrap().to_string());
                            let body = r.bytes().await;
                            let mut a = acked.lock().unwrap();
                            match (status, id, body) {
                                (StatusCode::OK, Some(id), Ok(_)) => {
                                    a.calls.push((customer.to_string(), id))
                                }
                                (StatusCode::PAYMENT_REQUIRED, _, _) => a.refused += 1,
                                (_, _, Err(_)) => a.lost_answers += 1,
                                (s, _, b) => panic!("gateway answered {s}: {b:?}"),
                            }
                            continue;
                        }
                        Err(_) => acked.lock().unwrap(),
                    };
                    a.lost_answers += 1;
                }
                let ids: Vec<String> = (0..10).map(|k| format!("ing-{w}-{n}-{k}")).collect();
                let events: Vec<Value> = ids
                    .iter()
                    .map(|id| event(id, &postpaid, json!({"timestamp": now})))
                    .collect();
                let r = client
                    .post(format!("{base}/v1/events"))
                    .bearer_auth(ADMIN_KEY)
                    .json(&json!({ "events": events }))
                    .send()
                    .await;
                let answered = match r {
                    Ok(r) => Some((r.status(), r.bytes().await.is_ok())),
                    Err(_) => None,
                };
                let mut a = acked.lock().unwrap();
                match answered {
                    Some((StatusCode::OK, true)) => a.ingested.extend(ids),
                    Some((s, _)) if !s.is_success() => panic!("ingestion answered {s}"),
                    _ => a.lost_answers += 1,
                }
            }
        }));
    }
    // Kill instance 2 with SIGKILL once the load is well under way, then let it run on.
    let started = Instant::now();
    while acked.lock().unwrap().calls.len() < 60 {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "the load never got going"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    fleet[2].kill();
    *dead.lock().unwrap() = Some(2);
    let at_kill = acked.lock().unwrap().calls.len();
    while acked.lock().unwrap().calls.len() < at_kill + 60 {
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "the survivors stalled"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    stop.store(true, Ordering::Relaxed);
    for w in workers {
        w.await.unwrap();
    }
    let acked = std::mem::take(&mut *acked.lock().unwrap());
    eprintln!(
        "acknowledged: {} ingested events, {} gateway calls ({} prepaid), {} refused with 402, {} unanswered",
        acked.ingested.len(),
        acked.calls.len(),
        acked.calls.iter().filter(|(c, _)| c == "wallet").count(),
        acked.refused,
        acked.lost_answers
    );

    // No acknowledged event lost or doubled (ids are unique in the ledger; the count of each
    // acknowledged id is checked anyway, and each prepaid call has exactly one charge).
    let pool = sqlx::PgPool::connect(&app.database_url).await.unwrap();
    let stored: Vec<(String, String)> = sqlx::query_as("SELECT id, customer_id FROM usage_events")
        .fetch_all(&pool)
        .await
        .unwrap();
    let mut count: std::collections::HashMap<&str, u32> = std::collections::HashMap::new();
    for (id, _) in &stored {
        *count.entry(id.as_str()).or_default() += 1;
    }
    for id in acked
        .ingested
        .iter()
        .chain(acked.calls.iter().map(|(_, id)| id))
    {
        assert_eq!(count.get(id.as_str()), Some(&1), "acknowledged event {id}");
    }
    let wallet_calls = acked.calls.iter().filter(|(c, _)| c == "wallet").count();
    assert!(wallet_calls >= 10, "{wallet_calls} prepaid calls served");
    assert!(acked.refused > 0, "the wallet ran out: some calls got 402");
    assert!(acked.lost_answers > 0 || acked.ingested.len() > 100);
    let doubled: Vec<(String, i64)> = sqlx::query_as(
        "SELECT event_id, COUNT(*) FROM wallet_transactions WHERE kind = 'charge' \
         GROUP BY event_id HAVING COUNT(*) > 1",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    assert!(doubled.is_empty(), "{doubled:?}");
    // Every prepaid event in the ledger has its charge, and the charges never exceed the
    // credits (the documented bound with instances that renew their shares: zero).
    let (events, charges, charged): (i64, i64, rust_decimal::Decimal) = sqlx::query_as(
        "SELECT (SELECT COUNT(*) FROM usage_events WHERE customer_id = 'wallet'), \
         (SELECT COUNT(*) FROM wallet_transactions WHERE customer_id = 'wallet' AND kind = 'charge'), \
         (SELECT COALESCE(-SUM(amount), 0) FROM wallet_transactions WHERE customer_id = 'wallet' AND kind = 'charge')",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(events, charges);
    assert!(
        charged <= "0.05".parse().unwrap(),
        "charged {charged} of a 0.05 wallet"
    );
    // The spend limit held for the fleet too: the month's revenue of "limited" is within it.
    let limited: (i64, Option<rust_decimal::Decimal>) = sqlx::query_as(
        "SELECT COUNT(*), SUM(revenue) FROM usage_events WHERE customer_id = 'limited'",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert!(limited.0 >= 5, "{limited:?}");
    assert!(
        limited.1.unwrap() <= "0.03".parse().unwrap(),
        "spent {limited:?} of a 0.03 limit"
    );
    let r = client
        .get(format!("{}/v1/customers/wallet/wallet", bases[0]))
        .bearer_auth(ADMIN_KEY)
        .send()
        .await
        .unwrap();
    let w: Value = r.json().await.unwrap();
    let balance: rust_decimal::Decimal = w["balance"].as_str().unwrap().parse().unwrap();
    assert!(balance >= rust_decimal::Decimal::ZERO, "{w}");

    // The billing run on both survivors at once (their schedulers run too): one invoice per
    // customer cycle, each charged once in localstripe.
    let (_, end) = fatura_core::billing::CycleSpec::default().cycle_containing(chrono::Utc::now());
    let at = (end + chrono::Duration::hours(2)).to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    let runs: Vec<_> = bases[..2]
        .iter()
        .map(|b| {
            let (client, url) = (client.clone(), format!("{b}/v1/billing/run?at={at}"));
            tokio::spawn(async move {
                client
                    .post(url)
                    .bearer_auth(ADMIN_KEY)
                    .json(&json!({}))
                    .send()
                    .await
                    .unwrap()
                    .status()
            })
        })
        .collect();
    for r in runs {
        assert_eq!(r.await.unwrap(), StatusCode::OK);
    }
    let customers_with_usage: std::collections::BTreeSet<&str> =
        stored.iter().map(|(_, c)| c.as_str()).collect();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let list: Value = client
            .get(format!("{}/v1/invoices", bases[1]))
            .bearer_auth(ADMIN_KEY)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let invoices: Vec<&Value> = list["data"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|i| i["kind"] == "invoice")
            .collect();
        let mut per_cycle = std::collections::HashMap::new();
        for i in &invoices {
            *per_cycle
                .entry((
                    i["customer_id"].as_str().unwrap(),
                    i["period_start"].as_str().unwrap(),
                ))
                .or_insert(0) += 1;
        }
        assert!(per_cycle.values().all(|n| *n == 1), "{list}");
        let billed: std::collections::BTreeSet<&str> = per_cycle.keys().map(|(c, _)| *c).collect();
        assert_eq!(billed, customers_with_usage, "{list}");
        let postpaid: Vec<&&Value> = invoices
            .iter()
            .filter(|i| ["p0", "p1", "p2"].contains(&i["customer_id"].as_str().unwrap()))
            .collect();
        if postpaid.iter().all(|i| i["status"] == "paid") {
            let intents = stripe_get(&ls, "/v1/payment_intents?limit=100").await;
            for i in postpaid {
                let id = i["id"].as_str().unwrap();
                let charged: Vec<&Value> = intents["data"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .filter(|p| {
                        p["metadata"]["fatura_invoice_id"] == id && p["status"] == "succeeded"
                    })
                    .collect();
                assert_eq!(charged.len(), 1, "invoice {id}: {intents}");
                let cents = (i["total"]
                    .as_str()
                    .unwrap()
                    .parse::<rust_decimal::Decimal>()
                    .unwrap()
                    * rust_decimal::Decimal::from(100))
                .round();
                assert_eq!(charged[0]["amount"].to_string(), cents.to_string(), "{i}");
            }
            break;
        }
        assert!(Instant::now() < deadline, "invoices never all paid: {list}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    for i in &mut fleet[..2] {
        i.terminate();
    }
}

/// Per-key rate limits hold for the fleet, not per instance: two processes, a key allowed 6
/// requests a minute, 16 calls alternating between them → exactly 6 answered, the rest 429
/// with `Retry-After`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limits_are_counted_across_instances() {
    let app = TestApp::start(Backend::Postgres).await;
    let mock = mock_upstream().await;
    let dir = tempfile::tempdir().unwrap();
    let mut fleet = Vec::new();
    for n in 0..2 {
        fleet.push(
            spawn_instance(
                dir.path(),
                n,
                &app.database_url,
                &mock,
                "http://127.0.0.1:9",
                "requests_per_minute = 6",
            )
            .await,
        );
    }
    catalog(
        &app,
        "2026-01-01T00:00:00Z",
        &[("openai/gpt-4o", "0.0000025", "0.00001")],
    )
    .await;
    let client = reqwest::Client::new();
    admin_post(
        &fleet[0].base,
        "/v1/customers",
        json!({"id": "acme", "name": "Acme"}),
    )
    .await;
    let key = admin_post(&fleet[0].base, "/v1/customers/acme/keys", json!({})).await["key"]
        .as_str()
        .unwrap()
        .to_string();
    // The 16 calls take well under a second; start them early in a minute so that they all
    // fall in one window.
    while chrono::Utc::now().timestamp() % 60 > 50 {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let (mut ok, mut limited) = (0, 0);
    for n in 0..16 {
        let r = client
            .post(format!("{}/v1/chat/completions", fleet[n % 2].base))
            .bearer_auth(&key)
            .json(&json!({"model": "openai/gpt-4o", "max_tokens": 5,
                          "messages": [{"role": "user", "content": "hi"}]}))
            .send()
            .await
            .unwrap();
        match r.status() {
            StatusCode::OK => ok += 1,
            StatusCode::TOO_MANY_REQUESTS => {
                assert!(r.headers().contains_key("retry-after"));
                limited += 1;
            }
            s => panic!("{s}: {}", r.text().await.unwrap()),
        }
    }
    assert_eq!((ok, limited), (6, 10));
    for i in &mut fleet {
        i.terminate();
    }
}

/// Background work resumes after an instance dies mid-job: instance A finalises an invoice
/// and dies while pushing its payment (here: its Stripe is unreachable, so the attempt stays
/// pending without a processor reference). While the attempt is fresh, no other instance
/// pushes it (its pusher may be alive); once it has been quiet for `PUSH_STALE`, two
/// instances collecting at once push it exactly once, with the same idempotency key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_payment_left_pending_by_a_dead_instance_is_pushed_again_exactly_once() {
    use common::stripe::{STRIPE_KEY, WEBHOOK_SECRET, card, localstripe, stripe_get};
    use fatura_server::payments::{CollectionPolicy, StripeProcessor};

    let ls = localstripe().await;
    let policy = CollectionPolicy {
        max_attempts: 3,
        retry_after: chrono::Duration::zero(),
    };
    let working = || -> Arc<dyn fatura_server::payments::PaymentProcessor> {
        Arc::new(StripeProcessor::new(&ls.base, STRIPE_KEY, WEBHOOK_SECRET))
    };
    let app = TestApp::start_full(Backend::Postgres, None, Some((working(), policy))).await;
    catalog(
        &app,
        "2026-01-01T00:00:00Z",
        &[("openai/gpt-4o", "0.0000025", "0.00001")],
    )
    .await;
    app.customer("acme").await;
    let pm = card(&ls, "4242424242424242").await;
    let (st, c) = app
        .post(
            "/v1/customers/acme/payment-methods",
            &json!({"payment_method": pm}),
        )
        .await;
    assert_eq!(st, StatusCode::OK, "{c}");
    let now = chrono::Utc::now();
    let (st, r) = app
        .post(
            "/v1/events",
            &json!({"events": [event("e1", "acme", json!({"timestamp": now.to_rfc3339(), "input_tokens": 1000000}))]}),
        )
        .await;
    assert_eq!(st, StatusCode::OK, "{r}");
    // Instance A: finalises the cycle, then fails to reach Stripe with the push.
    let instance = |processor: Arc<dyn fatura_server::payments::PaymentProcessor>| {
        fatura_server::AppState::new(app.fatura.clone(), ADMIN_KEY)
            .with_payments(processor, policy)
            .payments
            .unwrap()
    };
    let a = instance(Arc::new(StripeProcessor::new(
        "http://127.0.0.1:9",
        STRIPE_KEY,
        WEBHOOK_SECRET,
    )));
    let (_, end) = fatura_core::billing::CycleSpec::default().cycle_containing(now);
    let at = end + chrono::Duration::hours(2);
    let report = app
        .fatura
        .run_billing(at, fatura_server::service::BillingPolicy::default())
        .await
        .unwrap();
    assert_eq!(report.finalized.len(), 1);
    let invoice = report.finalized[0].id.clone();
    a.collect_due(chrono::Utc::now()).await.unwrap();
    let payments = || async { app.fatura.payments("acme", Some(&invoice)).await.unwrap() };
    let p = payments().await;
    assert_eq!(p.len(), 1, "{p:?}");
    assert_eq!(
        (p[0].status.as_str(), p[0].reference.as_deref()),
        ("pending", None)
    );
    let intents = || async {
        let all = stripe_get(&ls, "/v1/payment_intents?limit=100").await;
        all["data"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|i| i["metadata"]["fatura_invoice_id"] == invoice.as_str())
            .cloned()
            .collect::<Vec<Value>>()
    };
    // B and C, with a working Stripe, while the attempt is fresh: nothing is pushed.
    let (b, c) = (instance(working()), instance(working()));
    let (rb, rc) = tokio::join!(
        b.collect_due(chrono::Utc::now()),
        c.collect_due(chrono::Utc::now())
    );
    rb.unwrap();
    rc.unwrap();
    assert!(intents().await.is_empty());
    // A has been silent for longer than PUSH_STALE (its last update is moved back in the
    // database rather than waited for): B and C at once push it exactly once.
    let pool = sqlx::PgPool::connect(&app.database_url).await.unwrap();
    let moved =
        sqlx::query("UPDATE payments SET updated_at_us = updated_at_us - $1 WHERE invoice_id = $2")
            .bind(
                (fatura_server::payments::PUSH_STALE + chrono::Duration::seconds(1))
                    .num_microseconds()
                    .unwrap(),
            )
            .bind(&invoice)
            .execute(&pool)
            .await
            .unwrap();
    assert_eq!(moved.rows_affected(), 1);
    let (rb, rc) = tokio::join!(
        b.collect_due(chrono::Utc::now()),
        c.collect_due(chrono::Utc::now())
    );
    rb.unwrap();
    rc.unwrap();
    let pushed = intents().await;
    assert_eq!(pushed.len(), 1, "{pushed:?}");
    assert_eq!(
        pushed[0]["metadata"]["fatura_payment_id"],
        format!("fatura-{invoice}-attempt-1")
    );
    let p = payments().await;
    assert_eq!(p.len(), 1, "{p:?}");
    assert_eq!(p[0].reference.as_deref(), pushed[0]["id"].as_str());
}
