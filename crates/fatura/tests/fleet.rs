//! Several instances on one PostgreSQL: the live feed of every instance shows the calls
//! recorded by all of them (PostgreSQL NOTIFY from the inserting transaction, relayed into
//! each process's feed), each exactly once.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{ADMIN_KEY, Backend, TestApp, catalog, event};
use fatura_server::service::{Fatura, LiveCall};
use reqwest::StatusCode;
use serde_json::json;
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
