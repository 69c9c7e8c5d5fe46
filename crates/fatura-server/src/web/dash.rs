//! The operator's pages. Every figure comes from the same service calls as the HTTP API
//! (rollups for usage and money), so the dashboard and `/v1/analytics/*` always agree.

use fatura_core::status::InvoiceStatus;
use std::collections::BTreeMap;
use std::convert::Infallible;
use std::fmt::Write as _;

use axum::extract::{Path, State};
use axum::http::{StatusCode, header};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{Html, IntoResponse, Response};
use chrono::{Duration, Utc};
use fatura_core::rating::{PlanKind, TierMetric, TierMode};
use fatura_core::rollup::{Dims, Grain, RollupTotals};
use futures_util::Stream;
use rust_decimal::Decimal;

use super::chart::{Band, Series, daily_lines};
use super::{Admin, Fmt, layout, tr};
use crate::AppState;
use crate::render::{esc, invoice_html};
use crate::service::analytics::margin;

/// A failure while gathering a page: logged, answered 500 (or 404 for unknown ids).
pub(super) fn page_error(e: crate::service::ServiceError) -> Response {
    match e {
        crate::service::ServiceError::NotFound(m) => (
            StatusCode::NOT_FOUND,
            Html(format!(
                "<!DOCTYPE html><title>404</title><p>{}</p>",
                esc(&m)
            )),
        )
            .into_response(),
        e => {
            tracing::error!(error = %e, "page failed");
            (StatusCode::INTERNAL_SERVER_ERROR, "internal error").into_response()
        }
    }
}

fn card(id: &str, label: &str, value: &str, note: &str) -> String {
    format!(
        "<div class=\"card\" id=\"{id}\"><small>{label}</small><b data-value>{value}</b><small>{note}</small></div>"
    )
}

/// A table; `rows` are already-escaped cells; a header starting with `#` is numeric.
pub(super) fn table(id: &str, heads: &[&str], rows: &[Vec<String>], empty: &str) -> String {
    if rows.is_empty() {
        return format!("<p class=\"muted\" id=\"{id}\">{empty}</p>");
    }
    let mut out = format!("<table id=\"{id}\"><thead><tr>");
    for h in heads {
        match h.strip_prefix('#') {
            Some(h) => write!(out, "<th class=\"n\">{h}</th>").ok(),
            None => write!(out, "<th>{h}</th>").ok(),
        };
    }
    out.push_str("</tr></thead><tbody>");
    for r in rows {
        out.push_str("<tr>");
        for (i, c) in r.iter().enumerate() {
            let numeric = heads.get(i).is_some_and(|h| h.starts_with('#'));
            if numeric {
                write!(out, "<td class=\"n\">{c}</td>").ok();
            } else {
                write!(out, "<td>{c}</td>").ok();
            }
        }
        out.push_str("</tr>");
    }
    out.push_str("</tbody></table>");
    out
}

/// Daily revenue and cost over `[from, to)` (whole days) from the day rollups.
pub(super) async fn daily_series(
    state: &AppState,
    from: chrono::DateTime<Utc>,
    to: chrono::DateTime<Utc>,
    customer_id: Option<&str>,
) -> Result<Vec<(chrono::DateTime<Utc>, RollupTotals)>, crate::service::ServiceError> {
    let rows = state.fatura.usage_by_day(from, to, customer_id).await?;
    let mut days: BTreeMap<chrono::DateTime<Utc>, RollupTotals> = BTreeMap::new();
    let mut d = from;
    while d < to {
        days.insert(d, RollupTotals::default());
        d += Duration::days(1);
    }
    for (day, t) in rows {
        days.entry(day).or_default().add(&t);
    }
    Ok(days.into_iter().collect())
}

/// The end of the current minute: ranges "so far" read whole minutes.
fn now_minute(now: chrono::DateTime<Utc>) -> chrono::DateTime<Utc> {
    Grain::Minute.next(now)
}

/// Overview: the month so far against its forecast and the margin target.
pub async fn overview(State(state): State<AppState>, Admin(web): Admin) -> Response {
    let fmt = Fmt::new(&state, web.session.locale).await;
    let l = fmt.l;
    let now = state.fatura.now();
    let month = Grain::Month.bucket(now);
    let (summary, forecast, alerts) = match tokio::try_join!(
        state.fatura.summary(month, now_minute(now), None),
        state.fatura.fleet_forecast(now),
        state.fatura.alerts(),
    ) {
        Ok(x) => x,
        Err(e) => return page_error(e),
    };
    let t = &summary.totals;
    let target = state.fatura.margin().value();
    let gm = margin(t);
    let mut body = String::new();
    body.push_str(&format!(
        "<p class=\"muted\">{} · {}</p>",
        fmt.date(month),
        fmt.currency_note()
    ));
    body.push_str("<div class=\"cards\">");
    body.push_str(&card(
        "revenue",
        tr(l, "revenue"),
        &fmt.usd(t.revenue),
        tr(l, "mtd"),
    ));
    body.push_str(&card("cost", tr(l, "cost"), &fmt.usd(t.cost), tr(l, "mtd")));
    body.push_str(&card(
        "margin",
        tr(l, "gross_margin"),
        &fmt.pct(gm),
        &format!(
            "{} {}{}",
            tr(l, "target"),
            fmt.pct(Some(target)),
            if gm.is_some_and(|m| m < target) {
                " ⚠"
            } else {
                ""
            }
        ),
    ));
    body.push_str(&card(
        "forecast",
        tr(l, "forecast_month"),
        &fmt.usd(forecast.revenue.projected),
        &format!(
            "{}: {} – {}",
            tr(l, "interval"),
            fmt.usd(forecast.revenue.lower),
            fmt.usd(forecast.revenue.upper)
        ),
    ));
    body.push_str(&card(
        "requests",
        tr(l, "requests"),
        &fmt.int(t.requests),
        tr(l, "mtd"),
    ));
    body.push_str(&card(
        "tokens",
        tr(l, "tokens"),
        &fmt.int(t.tokens()),
        tr(l, "mtd"),
    ));
    body.push_str("</div>");
    // Chart: the last 56 days and the rest of the month's forecast.
    let today = Grain::Day.bucket(now);
    let history = match daily_series(
        &state,
        today - Duration::days(56),
        today + Duration::days(1),
        None,
    )
    .await
    {
        Ok(h) => h,
        Err(e) => return page_error(e),
    };
    let fy = |y: f64| fmt.usd(Decimal::from_f64_retain(y).unwrap_or_default().round_dp(0));
    let fx = |d: chrono::DateTime<Utc>| fmt.day(d);
    let svg = daily_lines(
        &[
            Series {
                label: tr(l, "revenue"),
                color: (20, 33, 61),
                points: history.iter().map(|(d, t)| (*d, t.revenue)).collect(),
                light: false,
            },
            Series {
                label: tr(l, "cost"),
                color: (200, 80, 40),
                points: history.iter().map(|(d, t)| (*d, t.cost)).collect(),
                light: false,
            },
            Series {
                label: tr(l, "forecast"),
                color: (252, 163, 17),
                points: forecast.daily.iter().map(|p| (p.0, p.1)).collect(),
                light: true,
            },
        ],
        Some(&Band {
            points: forecast.daily.iter().map(|p| (p.0, p.2, p.3)).collect(),
            color: (252, 163, 17),
        }),
        &fy,
        &fx,
    );
    body.push_str(&format!(
        "<h2>{}</h2><div id=\"chart-daily\">{svg}</div>",
        tr(l, "daily_revenue")
    ));
    body.push_str("<div class=\"grid\">");
    let (h_rev, h_margin, h_req) = (
        format!("#{}", tr(l, "revenue")),
        format!("#{}", tr(l, "margin")),
        format!("#{}", tr(l, "requests")),
    );
    for (dim, key, first) in [
        (2usize, "top_customers", tr(l, "customer")),
        (0, "top_models", tr(l, "model")),
        (3, "top_agents", tr(l, "agent")),
    ] {
        let rows: Vec<Vec<String>> = summary.top[dim]
            .1
            .iter()
            .map(|r| {
                let name = if dim == 2 {
                    format!("<a href=\"/dashboard/customers/{0}\">{0}</a>", esc(&r.name))
                } else {
                    esc(&r.name)
                };
                vec![
                    name,
                    fmt.usd(r.totals.revenue),
                    fmt.pct(margin(&r.totals)),
                    fmt.int(r.totals.requests),
                ]
            })
            .collect();
        body.push_str(&format!(
            "<div><h2>{}</h2>{}</div>",
            tr(l, key),
            table(
                key,
                &[first, &h_rev, &h_margin, &h_req],
                &rows,
                tr(l, "nothing")
            )
        ));
    }
    body.push_str("</div>");
    let alert_rows: Vec<Vec<String>> = alerts
        .iter()
        .rev()
        .take(10)
        .map(|a| {
            vec![
                fmt.time(a.last_seen),
                esc(&a.severity),
                esc(&a.kind),
                esc(&a.message),
            ]
        })
        .collect();
    body.push_str(&format!(
        "<h2>{}</h2>{}",
        tr(l, "alerts"),
        table(
            "alerts",
            &[tr(l, "when"), tr(l, "status"), tr(l, "kind"), ""],
            &alert_rows,
            tr(l, "no_alerts")
        )
    ));
    layout(
        &web,
        &fmt,
        tr(l, "overview"),
        "overview",
        "/dashboard",
        &body,
    )
    .into_response()
}

/// Live: calls as they are recorded, pushed by server-sent events.
pub async fn live(State(state): State<AppState>, Admin(web): Admin) -> Response {
    let fmt = Fmt::new(&state, web.session.locale).await;
    let l = fmt.l;
    let heads = [
        tr(l, "time"),
        tr(l, "customer"),
        tr(l, "model"),
        tr(l, "agent"),
        tr(l, "tokens"),
        tr(l, "cost"),
        tr(l, "price"),
        tr(l, "margin"),
    ];
    let mut body = format!(
        "<p class=\"muted\">{} {}</p><table id=\"live-feed\"><thead><tr>",
        tr(l, "live_hint"),
        fmt.currency_note()
    );
    for (i, h) in heads.iter().enumerate() {
        if i >= 4 {
            body.push_str(&format!("<th class=\"n\">{h}</th>"));
        } else {
            body.push_str(&format!("<th>{h}</th>"));
        }
    }
    body.push_str(
        "</tr></thead><tbody></tbody></table>\
<script>\
const tb=document.querySelector('#live-feed tbody');\
const es=new EventSource('/dashboard/live/stream');\
es.addEventListener('call',e=>{const c=JSON.parse(e.data);const tr=document.createElement('tr');tr.dataset.id=c.id;\
for(const [k,v] of [['time',c.time],['customer',c.customer],['model',c.model],['agent',c.agent],['tokens',c.tokens],['cost',c.cost],['price',c.price],['margin',c.margin]]){\
const td=document.createElement('td');td.textContent=v;td.dataset.k=k;if(['tokens','cost','price','margin'].includes(k))td.className='n';tr.appendChild(td);}\
tb.prepend(tr);while(tb.rows.length>200)tb.deleteRow(-1);});\
document.body.dataset.live='connecting';es.onopen=()=>{document.body.dataset.live='open'};\
</script>",
    );
    layout(&web, &fmt, tr(l, "live"), "live", "/dashboard/live", &body).into_response()
}

/// The live feed's event stream: one `call` event per recorded call, formatted for the
/// viewer's locale.
pub async fn live_stream(
    State(state): State<AppState>,
    Admin(web): Admin,
) -> Sse<impl Stream<Item = Result<Event, Infallible>>> {
    let fmt = Fmt::new(&state, web.session.locale).await;
    let rx = state.fatura.subscribe_live();
    let closing = state.closing.subscribe();
    let stream = futures_util::stream::unfold(
        (rx, closing, fmt),
        |(mut rx, mut closing, fmt)| async move {
            loop {
                if *closing.borrow() {
                    return None;
                }
                let got = tokio::select! {
                    got = rx.recv() => got,
                    _ = closing.changed() => return None,
                };
                match got {
                    Ok(c) => {
                        let data = serde_json::json!({
                            "id": c.id,
                            "time": c.timestamp.format("%H:%M:%S").to_string(),
                            "customer": c.customer_id,
                            "model": c.model,
                            "agent": c.agent.clone().unwrap_or_default(),
                            "tokens": fmt.int(i64::try_from(c.input_tokens + c.output_tokens).unwrap_or(i64::MAX)),
                            "cost": c.cost.map_or_else(|| "—".into(), |x| html_unescape(&fmt.usd(x))),
                            "price": c.price.map_or_else(|| "—".into(), |x| html_unescape(&fmt.usd(x))),
                            "margin": fmt.pct(c.margin()),
                        });
                        let ev = Event::default().event("call").data(data.to_string());
                        return Some((Ok(ev), (rx, closing, fmt)));
                    }
                    // A slow viewer skips what it missed.
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => continue,
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => return None,
                }
            }
        },
    );
    Sse::new(stream).keep_alive(KeepAlive::default())
}

/// Undoes [`esc`] for text that goes into JSON (the browser sets it as text, not HTML).
fn html_unescape(s: &str) -> String {
    s.replace("&lt;", "<")
        .replace("&gt;", ">")
        .replace("&quot;", "\"")
        .replace("&#39;", "'")
        .replace("&amp;", "&")
}

/// Customers: balance, spend this cycle, margin, plan, status.
pub async fn customers(State(state): State<AppState>, Admin(web): Admin) -> Response {
    let fmt = Fmt::new(&state, web.session.locale).await;
    let l = fmt.l;
    let now = state.fatura.now();
    let list = match state.fatura.customers().await {
        Ok(c) => c,
        Err(e) => return page_error(e),
    };
    let usage = match state.fatura.cycle_usage(&list, now).await {
        Ok(u) => u,
        Err(e) => return page_error(e),
    };
    let mut rows = Vec::new();
    for c in &list {
        let balance = if c.prepaid {
            match state.fatura.wallets().view(&c.id).await {
                Ok(b) => fmt.money(b.balance, c.currency),
                Err(e) => return page_error(e.into()),
            }
        } else {
            tr(l, "postpaid").to_string()
        };
        let plan = match state.fatura.customer_plan(&c.id, now).await {
            Ok((Some(p), _)) => esc(&p),
            Ok((None, _)) => tr(l, "default_plan").to_string(),
            Err(e) => return page_error(e),
        };
        let t = usage.get(&c.id).map(|u| u.1).unwrap_or_default();
        rows.push(vec![
            format!("<a href=\"/dashboard/customers/{0}\">{0}</a>", esc(&c.id)),
            esc(&c.name),
            c.currency.code().to_string(),
            balance,
            fmt.usd(t.revenue),
            fmt.pct(margin(&t)),
            plan,
            esc(c.status.as_str()),
        ]);
    }
    let body = format!(
        "<p class=\"muted\">{}</p>{}",
        fmt.currency_note(),
        table(
            "customers",
            &[
                "Id",
                tr(l, "customer"),
                tr(l, "currency"),
                &format!("#{}", tr(l, "balance")),
                &format!("#{}", tr(l, "spend_cycle")),
                &format!("#{}", tr(l, "margin")),
                tr(l, "plan"),
                tr(l, "status"),
            ],
            &rows,
            tr(l, "nothing"),
        )
    );
    layout(
        &web,
        &fmt,
        tr(l, "customers"),
        "customers",
        "/dashboard/customers",
        &body,
    )
    .into_response()
}

/// One customer: usage by model and agent, wallet, invoices, keys, forecast, ROI.
pub async fn customer(
    State(state): State<AppState>,
    Admin(web): Admin,
    Path(id): Path<String>,
) -> Response {
    let fmt = Fmt::new(&state, web.session.locale).await;
    let now = state.fatura.now();
    let c = match state.fatura.customer(&id).await {
        Ok(c) => c,
        Err(e) => return page_error(e),
    };
    let body = match customer_body(&state, &fmt, &c, now, true).await {
        Ok(b) => b,
        Err(e) => return page_error(e),
    };
    let back = format!("/dashboard/customers/{}", c.id);
    layout(
        &web,
        &fmt,
        &format!("{} — {}", c.name, c.id),
        "customers",
        &back,
        &body,
    )
    .into_response()
}

/// The body of a customer's page; `operator` adds cost, margin, keys and the wallet's
/// detail (the portal shows the customer's own view without them).
pub(super) async fn customer_body(
    state: &AppState,
    fmt: &Fmt,
    c: &fatura_store::Customer,
    now: chrono::DateTime<Utc>,
    operator: bool,
) -> Result<String, crate::service::ServiceError> {
    let l = fmt.l;
    let usage = state
        .fatura
        .cycle_usage(std::slice::from_ref(c), now)
        .await?;
    let (cycle_start, totals) = usage
        .get(&c.id)
        .copied()
        .unwrap_or((now, RollupTotals::default()));
    let mut body = format!(
        "<p class=\"muted\">{} {} · {} · {}</p><div class=\"cards\">",
        tr(l, "period"),
        fmt.date(cycle_start),
        c.currency.code(),
        if c.prepaid {
            tr(l, "prepaid")
        } else {
            tr(l, "postpaid")
        }
    );
    if c.prepaid {
        let b = state.fatura.wallets().view(&c.id).await?;
        body.push_str(&card(
            "balance",
            tr(l, "balance"),
            &fmt.money(b.balance, c.currency),
            &format!(
                "{}: {}",
                tr(l, "available"),
                fmt.money(b.available(), c.currency)
            ),
        ));
    }
    body.push_str(&card(
        "spend",
        tr(l, "spend_cycle"),
        &fmt.usd(totals.revenue),
        tr(l, "this_month"),
    ));
    if operator {
        body.push_str(&card(
            "customer-margin",
            tr(l, "gross_margin"),
            &fmt.pct(margin(&totals)),
            &fmt.usd(totals.cost),
        ));
    }
    body.push_str(&card(
        "customer-requests",
        tr(l, "requests"),
        &fmt.int(totals.requests),
        &format!("{} {}", fmt.int(totals.tokens()), tr(l, "tokens")),
    ));
    match state.fatura.forecast(&c.id, now, None).await {
        Ok(f) => {
            let note = match f.balance {
                Some((_, Some(day))) => format!("{} {}", tr(l, "runs_out"), fmt.date(day)),
                _ => format!(
                    "{}: {} – {}",
                    tr(l, "interval"),
                    fmt.usd(f.revenue.lower),
                    fmt.usd(f.revenue.upper)
                ),
            };
            body.push_str(&card(
                "customer-forecast",
                tr(l, "projected"),
                &fmt.usd(f.revenue.projected),
                &note,
            ));
        }
        Err(e) => tracing::debug!(error = %e, "no forecast"),
    }
    body.push_str("</div>");
    let today = Grain::Day.bucket(now);
    let history = daily_series(
        state,
        today - Duration::days(56),
        today + Duration::days(1),
        Some(&c.id),
    )
    .await?;
    let fy = |y: f64| fmt.usd(Decimal::from_f64_retain(y).unwrap_or_default().round_dp(0));
    let fx = |d: chrono::DateTime<Utc>| fmt.day(d);
    let mut lines = vec![Series {
        label: tr(l, "revenue"),
        color: (20, 33, 61),
        points: history.iter().map(|(d, t)| (*d, t.revenue)).collect(),
        light: false,
    }];
    if operator {
        lines.push(Series {
            label: tr(l, "cost"),
            color: (200, 80, 40),
            points: history.iter().map(|(d, t)| (*d, t.cost)).collect(),
            light: false,
        });
    }
    body.push_str(&format!(
        "<div id=\"chart-customer\">{}</div>",
        daily_lines(&lines, None, &fy, &fx)
    ));
    // Usage by model and agent this cycle.
    let by = Dims {
        model: true,
        agent: true,
        ..Dims::default()
    };
    let mut rows_by: BTreeMap<(String, String), RollupTotals> = BTreeMap::new();
    for (k, t) in state
        .fatura
        .rollups_over(cycle_start, Grain::Minute.next(now), Some(&c.id), by)
        .await?
    {
        rows_by.entry((k.model, k.agent)).or_default().add(&t);
    }
    let mut rows: Vec<Vec<String>> = rows_by
        .iter()
        .map(|((m, a), t)| {
            let mut r = vec![
                esc(m),
                esc(a),
                fmt.int(t.requests),
                fmt.int(t.tokens()),
                fmt.usd(t.revenue),
            ];
            if operator {
                r.push(fmt.usd(t.cost));
                r.push(fmt.pct(margin(t)));
            }
            r
        })
        .collect();
    rows.sort();
    let mut heads = vec![tr(l, "model"), tr(l, "agent"), "#Req.", "#Tokens"];
    let (h_spend, h_cost, h_margin) = (
        format!("#{}", tr(l, "spend")),
        format!("#{}", tr(l, "cost")),
        format!("#{}", tr(l, "margin")),
    );
    heads.push(&h_spend);
    if operator {
        heads.push(&h_cost);
        heads.push(&h_margin);
    }
    body.push_str(&format!(
        "<h2>{}</h2>{}",
        tr(l, "usage_model_agent"),
        table("usage-by-model", &heads, &rows, tr(l, "nothing"))
    ));
    // Invoices.
    let invoices = state.fatura.invoices(Some(&c.id), None).await?;
    let base = if operator {
        "/dashboard/invoices"
    } else {
        "/portal/invoices"
    };
    let inv_rows: Vec<Vec<String>> = invoices
        .iter()
        .filter(|i| operator || i.status != InvoiceStatus::Draft)
        .map(|i| {
            vec![
                format!(
                    "<a href=\"{base}/{0}\">{1}</a>",
                    esc(&i.id),
                    esc(i.number.as_deref().unwrap_or(&i.id))
                ),
                esc(i.status.as_str()),
                format!(
                    "{} – {}",
                    fmt.date(i.period_start),
                    fmt.date(i.period_end - Duration::seconds(1))
                ),
                fmt.money(i.total, i.currency),
                fmt.money(i.amount_due, i.currency),
            ]
        })
        .collect();
    body.push_str(&format!(
        "<h2>{}</h2>{}",
        if operator {
            tr(l, "invoices")
        } else {
            tr(l, "your_invoices")
        },
        table(
            "customer-invoices",
            &[
                tr(l, "number"),
                tr(l, "status"),
                tr(l, "period"),
                &format!("#{}", tr(l, "total")),
                &format!("#{}", tr(l, "amount_due"))
            ],
            &inv_rows,
            tr(l, "nothing")
        )
    ));
    if c.prepaid {
        let tx = state.fatura.wallet_movements(&c.id).await?;
        let rows: Vec<Vec<String>> = tx
            .iter()
            .rev()
            .take(20)
            .map(|t| {
                vec![
                    fmt.time(t.created_at),
                    esc(t.kind.as_str()),
                    fmt.money(t.amount, t.currency),
                ]
            })
            .collect();
        body.push_str(&format!(
            "<h2>{}</h2>{}",
            tr(l, "wallet"),
            table(
                "wallet",
                &[
                    tr(l, "when"),
                    tr(l, "kind"),
                    &format!("#{}", tr(l, "amount"))
                ],
                &rows,
                tr(l, "nothing")
            )
        ));
    }
    if operator {
        let keys = state.fatura.api_keys(&c.id).await?;
        let rows: Vec<Vec<String>> = keys
            .iter()
            .map(|k| {
                vec![
                    format!("<code>{}…</code>", esc(&k.prefix)),
                    fmt.time(k.created_at),
                    k.revoked_at.map_or_else(
                        || tr(l, "active").to_string(),
                        |r| format!("{} {}", tr(l, "revoked"), fmt.time(r)),
                    ),
                ]
            })
            .collect();
        body.push_str(&format!(
            "<h2>{}</h2>{}",
            tr(l, "keys"),
            table(
                "keys",
                &[tr(l, "prefix"), tr(l, "created"), tr(l, "status")],
                &rows,
                tr(l, "nothing")
            )
        ));
        let roi = state
            .fatura
            .roi(
                crate::service::analytics::Dimension::Agent,
                cycle_start,
                Grain::Minute.next(now),
                Some(&c.id),
            )
            .await?;
        let rows: Vec<Vec<String>> = roi
            .iter()
            .map(|r| {
                vec![
                    esc(&r.name),
                    fmt.int(r.outcomes),
                    fmt.usd(r.value),
                    fmt.usd(r.spend),
                    r.roi.map_or_else(
                        || "—".into(),
                        |x| format!("{}×", crate::render::format_decimal(x.round_dp(1), l)),
                    ),
                    r.cost_per_outcome
                        .map_or_else(|| "—".into(), |x| fmt.usd(x)),
                ]
            })
            .collect();
        body.push_str(&format!(
            "<h2>{}</h2>{}",
            tr(l, "roi"),
            table(
                "roi",
                &[
                    tr(l, "agent"),
                    &format!("#{}", tr(l, "outcomes")),
                    &format!("#{}", tr(l, "value")),
                    &format!("#{}", tr(l, "spend")),
                    "#ROI",
                    &format!("#{}", tr(l, "cost_per_outcome"))
                ],
                &rows,
                tr(l, "nothing")
            )
        ));
    }
    Ok(body)
}

/// Models and providers: cost, revenue and margin per model this month; the comparison.
pub async fn models(State(state): State<AppState>, Admin(web): Admin) -> Response {
    let fmt = Fmt::new(&state, web.session.locale).await;
    let l = fmt.l;
    let now = state.fatura.now();
    let month = Grain::Month.bucket(now);
    let by = Dims {
        provider: true,
        model: true,
        ..Dims::default()
    };
    let (rows, comparison) = match tokio::try_join!(
        state.fatura.rollups_over(month, now_minute(now), None, by),
        state
            .fatura
            .provider_comparison(month, now_minute(now), None),
    ) {
        Ok(x) => x,
        Err(e) => return page_error(e),
    };
    let mut per: BTreeMap<(String, String), RollupTotals> = BTreeMap::new();
    for (k, t) in rows {
        per.entry((k.provider, k.model)).or_default().add(&t);
    }
    let mut sorted: Vec<_> = per.into_iter().collect();
    sorted.sort_by_key(|x| std::cmp::Reverse(x.1.revenue));
    let table_rows: Vec<Vec<String>> = sorted
        .iter()
        .map(|((p, m), t)| {
            vec![
                esc(p),
                esc(m),
                fmt.int(t.requests),
                fmt.int(t.tokens()),
                fmt.usd(t.cost),
                fmt.usd(t.revenue),
                fmt.pct(margin(t)),
            ]
        })
        .collect();
    let mut body = format!(
        "<p class=\"muted\">{} · {}</p>",
        tr(l, "this_month"),
        fmt.currency_note()
    );
    body.push_str(&table(
        "models",
        &[
            tr(l, "provider"),
            tr(l, "model"),
            "#Req.",
            "#Tokens",
            &format!("#{}", tr(l, "cost")),
            &format!("#{}", tr(l, "revenue")),
            &format!("#{}", tr(l, "margin")),
        ],
        &table_rows,
        tr(l, "nothing"),
    ));
    let rows: Vec<Vec<String>> = comparison
        .iter()
        .map(|c| {
            let alts = if c.alternatives.is_empty() {
                format!("<span class=\"muted\">{}</span>", tr(l, "none"))
            } else {
                c.alternatives
                    .iter()
                    .map(|a| {
                        let class = if a.difference < Decimal::ZERO {
                            "warn"
                        } else {
                            "muted"
                        };
                        format!(
                            "{} {} <span class=\"{class}\">({}{})</span>",
                            esc(&a.provider),
                            fmt.usd(a.cost),
                            if a.difference >= Decimal::ZERO {
                                "+"
                            } else {
                                ""
                            },
                            fmt.usd(a.difference)
                        )
                    })
                    .collect::<Vec<_>>()
                    .join("<br>")
            };
            vec![
                esc(&c.provider),
                esc(&c.model),
                esc(&c.canonical),
                fmt.usd(c.actual_cost),
                alts,
            ]
        })
        .collect();
    body.push_str(&format!(
        "<h2>{}</h2>{}",
        tr(l, "comparison"),
        table(
            "comparison",
            &[
                tr(l, "provider"),
                tr(l, "model"),
                "Canonical",
                &format!("#{}", tr(l, "actual_cost")),
                tr(l, "alternatives")
            ],
            &rows,
            tr(l, "nothing")
        )
    ));
    layout(
        &web,
        &fmt,
        tr(l, "models"),
        "models",
        "/dashboard/models",
        &body,
    )
    .into_response()
}

/// Invoices: every invoice, newest first.
pub async fn invoices(State(state): State<AppState>, Admin(web): Admin) -> Response {
    let fmt = Fmt::new(&state, web.session.locale).await;
    let l = fmt.l;
    let mut list = match state.fatura.invoices(None, None).await {
        Ok(i) => i,
        Err(e) => return page_error(e),
    };
    list.sort_by(|a, b| {
        b.period_start
            .cmp(&a.period_start)
            .then(a.customer_id.cmp(&b.customer_id))
    });
    let rows: Vec<Vec<String>> = list
        .iter()
        .take(500)
        .map(|i| {
            vec![
                format!(
                    "<a href=\"/dashboard/invoices/{0}\">{1}</a>",
                    esc(&i.id),
                    esc(i.number.as_deref().unwrap_or(&i.id))
                ),
                format!(
                    "<a href=\"/dashboard/customers/{0}\">{0}</a>",
                    esc(&i.customer_id)
                ),
                esc(i.kind.as_str()),
                esc(i.status.as_str()),
                format!(
                    "{} – {}",
                    fmt.date(i.period_start),
                    fmt.date(i.period_end - Duration::seconds(1))
                ),
                fmt.money(i.total, i.currency),
                fmt.money(i.amount_due, i.currency),
            ]
        })
        .collect();
    let body = table(
        "invoices",
        &[
            tr(l, "number"),
            tr(l, "customer"),
            tr(l, "kind"),
            tr(l, "status"),
            tr(l, "period"),
            &format!("#{}", tr(l, "total")),
            &format!("#{}", tr(l, "amount_due")),
        ],
        &rows,
        tr(l, "nothing"),
    );
    layout(
        &web,
        &fmt,
        tr(l, "invoices"),
        "invoices",
        "/dashboard/invoices",
        &body,
    )
    .into_response()
}

/// One invoice: its figures, payments, and the customer's document.
pub async fn invoice(
    State(state): State<AppState>,
    Admin(web): Admin,
    Path(id): Path<String>,
) -> Response {
    let fmt = Fmt::new(&state, web.session.locale).await;
    let l = fmt.l;
    let inv = match state.fatura.invoice(&id).await {
        Ok(i) => i,
        Err(e) => return page_error(e),
    };
    let payments = match state.fatura.payments(&inv.customer_id, Some(&inv.id)).await {
        Ok(p) => p,
        Err(e) => return page_error(e),
    };
    let mut body = String::from("<div class=\"cards\">");
    body.push_str(&card(
        "invoice-status",
        tr(l, "status"),
        &esc(inv.status.as_str()),
        &inv.paid_at.map_or_else(String::new, |p| fmt.time(p)),
    ));
    body.push_str(&card(
        "invoice-total",
        tr(l, "total"),
        &fmt.money(inv.total, inv.currency),
        &format!("{} {}", fmt.int(inv.events), "events"),
    ));
    body.push_str(&card(
        "invoice-due",
        tr(l, "amount_due"),
        &fmt.money(inv.amount_due, inv.currency),
        &inv.due_at.map_or_else(String::new, |d| fmt.date(d)),
    ));
    body.push_str("</div>");
    if let Some(err) = &inv.last_payment_error {
        body.push_str(&format!("<p class=\"warn\">{}</p>", esc(err)));
    }
    let rows: Vec<Vec<String>> = payments
        .iter()
        .map(|p| {
            vec![
                fmt.time(p.created_at),
                esc(p.kind.as_str()),
                esc(p.status.as_str()),
                fmt.money(p.amount, p.currency),
                esc(p.error.as_deref().unwrap_or("")),
            ]
        })
        .collect();
    body.push_str(&format!(
        "<h2>{}</h2>{}",
        tr(l, "payments"),
        table(
            "payments",
            &[
                tr(l, "when"),
                tr(l, "kind"),
                tr(l, "status"),
                &format!("#{}", tr(l, "amount")),
                ""
            ],
            &rows,
            tr(l, "nothing")
        )
    ));
    body.push_str(&format!(
        "<h2>{}</h2><iframe title=\"invoice\" src=\"/dashboard/invoices/{}/document\"></iframe>",
        tr(l, "document"),
        esc(&inv.id)
    ));
    let title = format!(
        "{} {}",
        tr(l, "invoices"),
        inv.number.as_deref().unwrap_or(&inv.id)
    );
    let back = format!("/dashboard/invoices/{}", inv.id);
    layout(&web, &fmt, &title, "invoices", &back, &body).into_response()
}

/// The invoice document (the customer's rendering, in the customer's language).
pub async fn invoice_document(
    State(state): State<AppState>,
    Admin(_): Admin,
    Path(id): Path<String>,
) -> Response {
    document(&state, &id, None).await
}

/// An invoice's printable document; with `customer`, only that customer's non-draft ones.
pub(super) async fn document(state: &AppState, id: &str, customer: Option<&str>) -> Response {
    let inv = match state.fatura.invoice(id).await {
        Ok(i) => i,
        Err(e) => return page_error(e),
    };
    if customer.is_some_and(|c| c != inv.customer_id || inv.status == InvoiceStatus::Draft) {
        return page_error(crate::service::ServiceError::NotFound(format!(
            "no invoice {id:?}"
        )));
    }
    match crate::service::document_of(&inv) {
        Ok(doc) => (
            [(header::CONTENT_TYPE, "text/html; charset=utf-8")],
            invoice_html(&inv, &doc),
        )
            .into_response(),
        Err(e) => page_error(e),
    }
}

/// Pricing: plans and tiers, the catalog, recent changes and their margin impact, and
/// margin-floor events.
/// The pricing page's filter: one model's versions.
#[derive(Debug, serde::Deserialize)]
pub struct PricingQuery {
    /// Show every catalog version of this model.
    model: Option<String>,
}

pub async fn pricing(
    State(state): State<AppState>,
    Admin(web): Admin,
    axum::extract::Query(q): axum::extract::Query<PricingQuery>,
) -> Response {
    let fmt = Fmt::new(&state, web.session.locale).await;
    let l = fmt.l;
    let now = state.fatura.now();
    let (plans, prices, changes, alerts) = match tokio::try_join!(
        state.fatura.plans(now),
        state.fatura.prices(None, None, None),
        state.fatura.price_changes(now - Duration::days(30), now),
        state.fatura.alerts(),
    ) {
        Ok(x) => x,
        Err(e) => return page_error(e),
    };
    let plan_rows: Vec<Vec<String>> = plans
        .iter()
        .map(|p| {
            let t = &p.current.terms;
            let kind = match t.kind {
                PlanKind::CostPlus => format!("cost-plus {}", fmt.pct(t.margin)),
                PlanKind::List => "list".into(),
            };
            let tiers = t.tiers.as_ref().map_or_else(
                || "—".into(),
                |tiers| {
                    let metric = match tiers.metric {
                        TierMetric::Tokens => "tokens",
                        TierMetric::Spend => "spend",
                    };
                    let mode = match tiers.mode {
                        TierMode::Graduated => "graduated",
                        TierMode::Volume => "volume",
                    };
                    let steps = tiers
                        .tiers
                        .iter()
                        .map(|x| {
                            format!(
                                "{} → −{}",
                                x.up_to.map_or_else(
                                    || "∞".into(),
                                    |u| crate::render::format_decimal(u, l)
                                ),
                                fmt.pct(Some(x.discount))
                            )
                        })
                        .collect::<Vec<_>>()
                        .join("; ");
                    format!("{metric}, {mode}: {steps}")
                },
            );
            vec![
                esc(&p.current.plan_id),
                esc(&p.current.name),
                format!("v{}", p.current.version),
                t.currency.code().to_string(),
                kind,
                tiers,
                fmt.pct(Some(t.margin_floor)),
            ]
        })
        .collect();
    let mut body = format!(
        "<h2>{}</h2>{}",
        tr(l, "plans"),
        table(
            "plans",
            &[
                "Id",
                "Name",
                "v",
                tr(l, "currency"),
                tr(l, "kind_plan"),
                tr(l, "tiers"),
                &format!("#{}", tr(l, "floor"))
            ],
            &plan_rows,
            tr(l, "nothing")
        )
    );
    // The catalog: the latest version of each model, newest first.
    let mut latest: BTreeMap<(&str, &str), (&fatura_core::catalog::PriceVersion, usize)> =
        BTreeMap::new();
    for v in &prices {
        let e = latest
            .entry((v.provider.as_str(), v.model.as_str()))
            .or_insert((v, 0));
        e.1 += 1;
        if v.effective_from > e.0.effective_from {
            e.0 = v;
        }
    }
    let mut catalog: Vec<_> = latest.into_values().collect();
    catalog.sort_by(|a, b| {
        b.0.effective_from
            .cmp(&a.0.effective_from)
            .then(a.0.model.cmp(&b.0.model))
    });
    let million = Decimal::from(1_000_000);
    let cat_rows: Vec<Vec<String>> = catalog
        .iter()
        .take(200)
        .map(|(v, n)| {
            vec![
                esc(&v.provider),
                format!(
                    "<a href=\"/dashboard/pricing?model={}#versions\">{}</a>",
                    esc(&url_component(&v.model)),
                    esc(&v.model)
                ),
                fmt.time(v.effective_from),
                fmt.usd(v.prices.prompt.value() * million),
                fmt.usd(v.prices.completion.value() * million),
                fmt.int(i64::try_from(*n).unwrap_or(i64::MAX)),
            ]
        })
        .collect();
    if let Some(model) = q.model.as_deref() {
        let mut versions: Vec<&fatura_core::catalog::PriceVersion> =
            prices.iter().filter(|v| v.model == model).collect();
        versions.sort_by(|a, b| {
            b.effective_from
                .cmp(&a.effective_from)
                .then(a.provider.cmp(&b.provider))
        });
        let rows: Vec<Vec<String>> = versions
            .iter()
            .map(|v| {
                vec![
                    esc(&v.provider),
                    fmt.time(v.effective_from),
                    fmt.usd(v.prices.prompt.value() * million),
                    fmt.usd(v.prices.completion.value() * million),
                    v.prices
                        .cache_read
                        .map_or_else(|| "—".into(), |p| fmt.usd(p.value() * million)),
                ]
            })
            .collect();
        body.push_str(&format!(
            "<h2 id=\"versions\">{} — {}</h2>{}",
            tr(l, "versions"),
            esc(model),
            table(
                "model-versions",
                &[
                    tr(l, "provider"),
                    tr(l, "effective"),
                    &format!("#{}", tr(l, "input_1m")),
                    &format!("#{}", tr(l, "output_1m")),
                    "#Cache / 1M",
                ],
                &rows,
                tr(l, "nothing"),
            )
        ));
    }
    body.push_str(&format!(
        "<h2>{}</h2><p class=\"muted\">{} · {} {}</p>{}",
        tr(l, "catalog"),
        fmt.currency_note(),
        fmt.int(i64::try_from(catalog.len()).unwrap_or(i64::MAX)),
        tr(l, "models").to_lowercase(),
        table(
            "catalog",
            &[
                tr(l, "provider"),
                tr(l, "model"),
                tr(l, "effective"),
                &format!("#{}", tr(l, "input_1m")),
                &format!("#{}", tr(l, "output_1m")),
                &format!("#{}", tr(l, "versions"))
            ],
            &cat_rows,
            tr(l, "nothing")
        )
    ));
    let change_rows: Vec<Vec<String>> = changes
        .impact
        .iter()
        .map(|m| {
            vec![
                esc(&m.plan_id),
                esc(&m.provider),
                esc(&m.model),
                fmt.pct(m.worst_margin),
                fmt.pct(Some(m.margin_floor)),
                if m.below_floor {
                    format!("<span class=\"warn\">{}</span>", tr(l, "below_floor"))
                } else {
                    String::new()
                },
            ]
        })
        .collect();
    body.push_str(&format!(
        "<h2>{}</h2><p class=\"muted\">{} {}</p>{}",
        tr(l, "changes"),
        fmt.int(i64::try_from(changes.changes.len()).unwrap_or(i64::MAX)),
        tr(l, "versions"),
        table(
            "price-changes",
            &[
                tr(l, "plan"),
                tr(l, "provider"),
                tr(l, "model"),
                &format!("#{}", tr(l, "worst_margin")),
                &format!("#{}", tr(l, "floor")),
                ""
            ],
            &change_rows,
            tr(l, "nothing")
        )
    ));
    let floor_rows: Vec<Vec<String>> = alerts
        .iter()
        .rev()
        .filter(|a| a.kind.contains("floor"))
        .take(50)
        .map(|a| {
            vec![
                fmt.time(a.last_seen),
                esc(a.plan_id.as_deref().unwrap_or("")),
                esc(a.model.as_deref().unwrap_or("")),
                esc(&a.message),
            ]
        })
        .collect();
    body.push_str(&format!(
        "<h2>{}</h2>{}",
        tr(l, "floor_events"),
        table(
            "floor-events",
            &[tr(l, "when"), tr(l, "plan"), tr(l, "model"), ""],
            &floor_rows,
            tr(l, "nothing")
        )
    ));
    layout(
        &web,
        &fmt,
        tr(l, "pricing"),
        "pricing",
        "/dashboard/pricing",
        &body,
    )
    .into_response()
}

/// Percent-encodes a query value.
fn url_component(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~/".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}
