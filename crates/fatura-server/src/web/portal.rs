//! The customer portal: a customer signed in with one of its API keys sees its own usage,
//! balance, invoices (with the transparent breakdown) and forecast — nothing else. There is
//! no customer id in its URLs; an invoice of another customer answers 404.

use axum::extract::{Path, State};
use axum::response::{IntoResponse, Response};

use super::dash::{customer_body, document, page_error};
use super::{Customer, Fmt, layout, tr};
use crate::AppState;

/// The customer's page.
pub async fn home(State(state): State<AppState>, Customer(web, id): Customer) -> Response {
    let fmt = Fmt::new(&state, web.session.locale).await;
    let c = match state.fatura.customer(&id).await {
        Ok(c) => c,
        Err(e) => return page_error(e),
    };
    let body = match customer_body(&state, &fmt, &c, state.fatura.now(), false).await {
        Ok(b) => b,
        Err(e) => return page_error(e),
    };
    let title = format!("{} — {}", tr(fmt.l, "portal"), c.name);
    layout(&web, &fmt, &title, "portal", "/portal", &body).into_response()
}

/// One of the customer's invoices (finalised ones only), as the printable document.
pub async fn invoice(
    State(state): State<AppState>,
    Customer(_, id): Customer,
    Path(invoice_id): Path<String>,
) -> Response {
    document(&state, &invoice_id, Some(&id)).await
}
