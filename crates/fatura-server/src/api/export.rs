//! CSV exports, streamed: rows are read a page at a time (keyset pagination) and written to
//! the response as they come, so an export of any size holds one page in memory.

use axum::body::{Body, Bytes};
use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::http::header;
use axum::response::{IntoResponse, Response};
use fatura_core::status::InvoiceStatus;
use fatura_store::{ExportRow, UsageFilter};
use serde::Deserialize;
use utoipa::IntoParams;

use super::usage::parse_usage_query;
use crate::AppState;
use crate::auth::Caller;
use crate::error::{ApiError, ErrorBody};

/// Rows per page read from the database.
const PAGE: u32 = 2_000;

fn csv_field(s: &str) -> String {
    if s.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_string()
    }
}

fn usage_line(r: &ExportRow, operator: bool) -> String {
    let u = &r.usage;
    let opt =
        |d: Option<rust_decimal::Decimal>| d.map(|d| d.normalize().to_string()).unwrap_or_default();
    let mut fields = vec![
        r.id.clone(),
        r.customer_id.clone(),
        r.timestamp.to_rfc3339(),
        r.provider.clone(),
        r.model.clone(),
        u.input().to_string(),
        u.output().to_string(),
        u.cached_input().to_string(),
        u.cache_write().to_string(),
        u.reasoning().to_string(),
        u.requests().to_string(),
        opt(r.revenue),
    ];
    if operator {
        fields.push(opt(r.cost));
        fields.push(r.upstream.clone().unwrap_or_default());
    }
    fields.push(r.tags.clone());
    let mut line = fields
        .iter()
        .map(|f| csv_field(f))
        .collect::<Vec<_>>()
        .join(",");
    line.push_str("\r\n");
    line
}

/// Events matching the usage filters of `GET /v1/usage` (`customer_id`, `from`, `to`,
/// `provider`, `model`, `tag.NAME`) as CSV, streamed in `(timestamp, id)` order. Customer keys
/// export their own usage, without cost.
#[utoipa::path(get, path = "/v1/export/usage.csv", tag = "analytics",
    responses((status = 200, description = "CSV, streamed", body = String, content_type = "text/csv"),
              (status = 400, body = ErrorBody), (status = 401, body = ErrorBody), (status = 403, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn usage_csv(
    State(state): State<AppState>,
    caller: Caller,
    query: Result<Query<Vec<(String, String)>>, QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(pairs) = query?;
    let parsed = parse_usage_query(pairs)?;
    if !parsed.group_by.is_empty() {
        return Err(ApiError::bad_request(
            "invalid_query",
            "group_by: an export lists events; use /v1/usage or /v1/analytics for groups",
        ));
    }
    let mut filter: UsageFilter = parsed.filter;
    filter.customer_id = caller.scope_customer(parsed.customer)?;
    let operator = matches!(caller, Caller::Admin);
    let mut header_line = String::from(
        "id,customer_id,timestamp,provider,model,input_tokens,output_tokens,cached_input_tokens,\
         cache_write_tokens,reasoning_tokens,requests,revenue",
    );
    if operator {
        header_line.push_str(",cost,upstream");
    }
    header_line.push_str(",tags\r\n");
    let store = state.fatura.clone();
    // The first page is read before answering, so that a database error is a clean 500.
    let first = store.usage_page(&filter, None, PAGE).await?;
    let first_chunk = {
        let mut s = header_line;
        for r in &first {
            s.push_str(&usage_line(r, operator));
        }
        s
    };
    let cursor = (first.len() == PAGE as usize)
        .then(|| first.last().map(|r| (r.timestamp, r.id.clone())))
        .flatten();
    let rest = futures_util::stream::unfold(
        (store, filter, cursor),
        move |(store, filter, cursor)| async move {
            let after = cursor?;
            match store.usage_page(&filter, Some(after), PAGE).await {
                Ok(rows) if rows.is_empty() => None,
                Ok(rows) => {
                    let next = (rows.len() == PAGE as usize)
                        .then(|| rows.last().map(|r| (r.timestamp, r.id.clone())))
                        .flatten();
                    let chunk: String = rows.iter().map(|r| usage_line(r, operator)).collect();
                    Some((
                        Ok::<Bytes, std::io::Error>(Bytes::from(chunk)),
                        (store, filter, next),
                    ))
                }
                Err(e) => {
                    // Headers are sent: cut the stream so the client sees an incomplete file.
                    tracing::error!(error = %e, "usage export failed mid-stream");
                    Some((
                        Err(std::io::Error::other("export failed")),
                        (store, filter, None),
                    ))
                }
            }
        },
    );
    use futures_util::StreamExt;
    let first = futures_util::stream::iter([Ok::<Bytes, std::io::Error>(Bytes::from(first_chunk))]);
    let body = first.chain(rest);
    Ok((
        [
            (header::CONTENT_TYPE, "text/csv; charset=utf-8"),
            (
                header::CONTENT_DISPOSITION,
                "attachment; filename=\"usage.csv\"",
            ),
        ],
        Body::from_stream(body),
    )
        .into_response())
}

/// Query of `GET /v1/export/invoices.csv`.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct InvoicesExportQuery {
    /// Only this customer (a customer key: only its own).
    pub customer_id: Option<String>,
    /// `draft`, `open`, `paid` or `void`.
    pub status: Option<String>,
}

/// Invoices and credit notes as CSV, one row each.
#[utoipa::path(get, path = "/v1/export/invoices.csv", tag = "billing", params(InvoicesExportQuery),
    responses((status = 200, description = "CSV", body = String, content_type = "text/csv"),
              (status = 400, body = ErrorBody), (status = 401, body = ErrorBody), (status = 403, body = ErrorBody),
              (status = 422, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn invoices_csv(
    State(state): State<AppState>,
    caller: Caller,
    query: Result<Query<InvoicesExportQuery>, QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(q) = query?;
    let customer = caller.scope_customer(q.customer_id)?;
    let operator = matches!(caller, Caller::Admin);
    let list = state
        .fatura
        .invoices(
            customer.as_deref(),
            crate::service::parse_invoice_status(q.status.as_deref())?,
        )
        .await?;
    let mut out = String::from(
        "id,number,kind,status,customer_id,period_start,period_end,currency,subtotal,tax,total,\
         prepaid_applied,amount_due,finalized_at,due_at,paid_at,events\r\n",
    );
    let t =
        |d: Option<chrono::DateTime<chrono::Utc>>| d.map(|d| d.to_rfc3339()).unwrap_or_default();
    for i in list
        .into_iter()
        .filter(|i| operator || i.status != InvoiceStatus::Draft)
    {
        let fields = [
            i.id,
            i.number.unwrap_or_default(),
            i.kind.as_str().into(),
            i.status.as_str().into(),
            i.customer_id,
            i.period_start.to_rfc3339(),
            i.period_end.to_rfc3339(),
            i.currency.code().to_string(),
            i.subtotal.to_string(),
            i.tax.to_string(),
            i.total.to_string(),
            i.prepaid_applied.to_string(),
            i.amount_due.to_string(),
            t(i.finalized_at),
            t(i.due_at),
            t(i.paid_at),
            i.events.to_string(),
        ];
        out.push_str(
            &fields
                .iter()
                .map(|f| csv_field(f))
                .collect::<Vec<_>>()
                .join(","),
        );
        out.push_str("\r\n");
    }
    Ok((
        [
            (header::CONTENT_TYPE, "text/csv; charset=utf-8"),
            (
                header::CONTENT_DISPOSITION,
                "attachment; filename=\"invoices.csv\"",
            ),
        ],
        out,
    )
        .into_response())
}
