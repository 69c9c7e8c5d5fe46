//! The browser side of fatura, served by the same binary: the operator's dashboard under
//! `/dashboard` and the customers' portal under `/portal`, rendered on the server (HTML and
//! SVG charts; a few lines of JS only for the live feed).
//!
//! Security of the web layer:
//! - Sign-in exchanges the admin key (dashboard) or a customer API key (portal) for a
//!   session cookie: random 256-bit token, `HttpOnly`, `SameSite=Strict`, `Secure` when the
//!   request came over TLS (`X-Forwarded-Proto: https` from the proxy in front); only the
//!   token's SHA-256 is kept server-side, sessions expire after [`SESSION_TTL`].
//! - Every form carries a CSRF token compared in constant time: the session's for signed-in
//!   forms, a double-submit cookie for the sign-in forms. A post without it is refused (403)
//!   and changes nothing.
//! - No secret is ever rendered: keys show their prefix only.
//! - A portal session reaches only its own customer's data; other ids answer 404.

pub mod chart;
mod dash;
mod portal;

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::{FromRequestParts, Query, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{Html, IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use chrono::{DateTime, Utc};
use fatura_core::Currency;
use rand::RngCore;
use rust_decimal::Decimal;
use serde::Deserialize;
use subtle::ConstantTimeEq;

use crate::AppState;
use crate::render::{Locale, esc, format_decimal, format_money};
use crate::service::hash_api_key;

/// How long a session lasts.
pub const SESSION_TTL: Duration = Duration::from_secs(12 * 3600);
const SESSION_COOKIE: &str = "fatura_session";
const LOGIN_CSRF_COOKIE: &str = "fatura_login_csrf";

/// Who a session belongs to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Who {
    /// The operator.
    Admin,
    /// A customer, signed in with one of its keys (SHA-256 of the key, to end the session
    /// when the key is revoked).
    Customer {
        /// Customer id.
        customer_id: String,
        /// The key's hash.
        key_hash: String,
    },
}

/// A signed-in browser.
#[derive(Debug, Clone)]
pub struct Session {
    /// Who.
    pub who: Who,
    /// The token forms must carry.
    pub csrf: String,
    /// Display language.
    pub locale: Locale,
    expires: Instant,
}

/// Sessions of this process, by SHA-256 of the cookie token.
#[derive(Debug, Default)]
pub struct Sessions {
    map: Mutex<HashMap<String, Session>>,
}

fn random_token() -> String {
    let mut b = [0u8; 32];
    rand::rng().fill_bytes(&mut b);
    hex::encode(b)
}

impl Sessions {
    fn create(&self, who: Who, locale: Locale) -> String {
        let token = random_token();
        let session = Session {
            who,
            csrf: random_token(),
            locale,
            expires: Instant::now() + SESSION_TTL,
        };
        if let Ok(mut m) = self.map.lock() {
            let now = Instant::now();
            m.retain(|_, s| s.expires > now);
            m.insert(hash_api_key(&token), session);
        }
        token
    }

    fn get(&self, token: &str) -> Option<Session> {
        let m = self.map.lock().ok()?;
        m.get(&hash_api_key(token))
            .filter(|s| s.expires > Instant::now())
            .cloned()
    }

    fn remove(&self, token: &str) {
        if let Ok(mut m) = self.map.lock() {
            m.remove(&hash_api_key(token));
        }
    }

    fn set_locale(&self, token: &str, locale: Locale) {
        if let Ok(mut m) = self.map.lock()
            && let Some(s) = m.get_mut(&hash_api_key(token))
        {
            s.locale = locale;
        }
    }
}

fn cookie<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v)
}

fn over_tls(headers: &HeaderMap) -> bool {
    headers
        .get("x-forwarded-proto")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case("https"))
}

fn set_cookie(name: &str, value: &str, max_age: u64, secure: bool) -> HeaderValue {
    let v = format!(
        "{name}={value}; Path=/; HttpOnly; SameSite=Strict; Max-Age={max_age}{}",
        if secure { "; Secure" } else { "" }
    );
    HeaderValue::from_str(&v).unwrap_or_else(|_| HeaderValue::from_static(""))
}

fn same(a: &str, b: &str) -> bool {
    a.len() == b.len() && bool::from(a.as_bytes().ct_eq(b.as_bytes()))
}

/// A signed-in request (any kind), with its cookie token.
pub struct Web {
    /// The session.
    pub session: Session,
    token: String,
}

/// Why a page could not be shown to this browser.
pub enum WebRejection {
    /// Not signed in (or signed in as the other kind): to the sign-in page.
    SignIn(&'static str),
    /// A failure reading state.
    Internal,
}

impl IntoResponse for WebRejection {
    fn into_response(self) -> Response {
        match self {
            WebRejection::SignIn(to) => Redirect::to(to).into_response(),
            WebRejection::Internal => {
                (StatusCode::INTERNAL_SERVER_ERROR, "internal error").into_response()
            }
        }
    }
}

async fn web_session(parts: &Parts, state: &AppState) -> Option<Web> {
    let token = cookie(&parts.headers, SESSION_COOKIE)?;
    let session = state.sessions.get(token)?;
    Some(Web {
        session,
        token: token.to_string(),
    })
}

/// A signed-in operator.
pub struct Admin(pub Web);

impl FromRequestParts<AppState> for Admin {
    type Rejection = WebRejection;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &AppState,
    ) -> Result<Self, Self::Rejection> {
        match web_session(parts, state).await {
            Some(w) if w.session.who == Who::Admin => Ok(Admin(w)),
            _ => Err(WebRejection::SignIn("/login")),
        }
    }
}

/// A signed-in customer (whose key is still active).
pub struct Customer(pub Web, pub String);

impl FromRequestParts<AppState> for Customer {
    type Rejection = WebRejection;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &AppState,
    ) -> Result<Self, Self::Rejection> {
        let Some(w) = web_session(parts, state).await else {
            return Err(WebRejection::SignIn("/portal/login"));
        };
        let Who::Customer {
            customer_id,
            key_hash,
        } = &w.session.who
        else {
            return Err(WebRejection::SignIn("/portal/login"));
        };
        match state.fatura.verify_key(key_hash).await {
            Ok(Some(k)) if k.customer_id == *customer_id => {
                let id = customer_id.clone();
                Ok(Customer(w, id))
            }
            Ok(_) => {
                state.sessions.remove(&w.token);
                Err(WebRejection::SignIn("/portal/login"))
            }
            Err(_) => Err(WebRejection::Internal),
        }
    }
}

/// A posted form: its fields.
pub type Fields = HashMap<String, String>;

/// Whether a signed-in form carries its session's CSRF token.
fn csrf_ok(web: &Web, fields: &Fields) -> bool {
    fields
        .get("csrf")
        .is_some_and(|t| same(t, &web.session.csrf))
}

fn forbidden() -> Response {
    (
        StatusCode::FORBIDDEN,
        Html("<!DOCTYPE html><title>403</title><p>Forbidden: the form's security token is missing or wrong. Reload the page and try again.</p>"),
    )
        .into_response()
}

// ---- translation -----------------------------------------------------------------------

/// Translates a dashboard label.
pub fn tr(l: Locale, key: &'static str) -> &'static str {
    let pt = l == Locale::PtBr;
    macro_rules! t {
        ($($k:literal => $en:literal, $pt:literal;)*) => {
            match key {
                $($k => if pt { $pt } else { $en },)*
                _ => key,
            }
        };
    }
    t! {
        "overview" => "Overview", "Visão geral";
        "live" => "Live", "Ao vivo";
        "customers" => "Customers", "Clientes";
        "models" => "Models & providers", "Modelos e provedores";
        "invoices" => "Invoices", "Faturas";
        "pricing" => "Pricing", "Preços";
        "sign_out" => "Sign out", "Sair";
        "sign_in" => "Sign in", "Entrar";
        "admin_key" => "Admin key", "Chave de administrador";
        "api_key" => "API key", "Chave de API";
        "portal" => "Customer portal", "Portal do cliente";
        "revenue" => "Revenue", "Receita";
        "cost" => "Upstream cost", "Custo upstream";
        "gross_margin" => "Gross margin", "Margem bruta";
        "target" => "target", "meta";
        "mtd" => "Month to date", "Mês até hoje";
        "forecast_month" => "Forecast for the month", "Previsão do mês";
        "requests" => "Requests", "Requisições";
        "tokens" => "Tokens", "Tokens";
        "top_customers" => "Top customers", "Principais clientes";
        "top_models" => "Top models", "Principais modelos";
        "top_agents" => "Top agents", "Principais agentes";
        "alerts" => "Alerts", "Alertas";
        "no_alerts" => "No alerts.", "Nenhum alerta.";
        "daily_revenue" => "Daily revenue and cost", "Receita e custo diários";
        "forecast" => "Forecast", "Previsão";
        "interval" => "80% interval", "intervalo de 80%";
        "time" => "Time", "Hora";
        "customer" => "Customer", "Cliente";
        "model" => "Model", "Modelo";
        "provider" => "Provider", "Provedor";
        "agent" => "Agent", "Agente";
        "price" => "Price", "Preço";
        "margin" => "Margin", "Margem";
        "balance" => "Balance", "Saldo";
        "available" => "Available", "Disponível";
        "spend_cycle" => "Spend this cycle", "Gasto no ciclo";
        "plan" => "Plan", "Plano";
        "default_plan" => "default (cost-plus)", "padrão (custo + margem)";
        "status" => "Status", "Situação";
        "currency" => "Currency", "Moeda";
        "billing" => "Billing", "Cobrança";
        "prepaid" => "prepaid", "pré-pago";
        "postpaid" => "postpaid", "pós-pago";
        "usage_model_agent" => "Usage this cycle by model and agent", "Uso no ciclo por modelo e agente";
        "wallet" => "Wallet transactions", "Movimentações da carteira";
        "kind" => "Kind", "Tipo";
        "amount" => "Amount", "Valor";
        "when" => "When", "Quando";
        "keys" => "API keys", "Chaves de API";
        "prefix" => "Prefix", "Prefixo";
        "created" => "Created", "Criada";
        "revoked" => "Revoked", "Revogada";
        "active" => "active", "ativa";
        "roi" => "ROI by agent", "ROI por agente";
        "value" => "Value", "Valor gerado";
        "spend" => "Spend", "Gasto";
        "outcomes" => "Outcomes", "Resultados";
        "cost_per_outcome" => "Cost per outcome", "Custo por resultado";
        "projected" => "Projected for the cycle", "Projetado para o ciclo";
        "runs_out" => "Balance runs out around", "Saldo acaba por volta de";
        "comparison" => "Provider comparison (this month)", "Comparação de provedores (este mês)";
        "actual_cost" => "Actual cost", "Custo real";
        "alternatives" => "At other providers", "Em outros provedores";
        "none" => "none in the catalog", "nenhum no catálogo";
        "number" => "Number", "Número";
        "period" => "Period", "Período";
        "total" => "Total", "Total";
        "amount_due" => "Amount due", "Valor a pagar";
        "payments" => "Payments", "Pagamentos";
        "document" => "Document", "Documento";
        "plans" => "Plans and tiers", "Planos e faixas";
        "catalog" => "Price catalog", "Catálogo de preços";
        "versions" => "versions", "versões";
        "effective" => "Effective from", "Vigente desde";
        "input_1m" => "Input / 1M", "Entrada / 1M";
        "output_1m" => "Output / 1M", "Saída / 1M";
        "changes" => "Recent price changes and margin impact", "Mudanças recentes de preço e impacto na margem";
        "floor_events" => "Margin-floor events", "Eventos de piso de margem";
        "worst_margin" => "Worst margin", "Pior margem";
        "below_floor" => "below floor", "abaixo do piso";
        "live_hint" => "Calls appear here as they pass through the gateway.", "As chamadas aparecem aqui ao passar pelo gateway.";
        "language" => "Language", "Idioma";
        "nothing" => "Nothing yet.", "Nada ainda.";
        "your_usage" => "Your usage this cycle", "Seu uso no ciclo";
        "your_invoices" => "Your invoices", "Suas faturas";
        "amounts_in" => "Amounts in", "Valores em";
        "at_rate" => "at", "à taxa";
        "tiers" => "Tiers", "Faixas";
        "floor" => "Floor", "Piso";
        "kind_plan" => "Kind", "Tipo";
        "this_month" => "this month", "este mês";
        "shown" => "shown", "exibidas";
    }
}

// ---- formatting ------------------------------------------------------------------------

/// How a page shows figures: locale, and USD amounts in the display currency (BRL in
/// Portuguese when a USD→BRL rate is recorded, else USD).
#[derive(Debug, Clone)]
pub struct Fmt {
    /// Locale.
    pub l: Locale,
    /// Display currency of operator (USD) figures.
    pub cur: Currency,
    /// USD → display currency.
    pub rate: Decimal,
    /// The rate's date, when converted.
    pub rate_date: Option<chrono::NaiveDate>,
}

impl Fmt {
    async fn new(state: &AppState, l: Locale) -> Fmt {
        let usd = Fmt {
            l,
            cur: Currency::Usd,
            rate: Decimal::ONE,
            rate_date: None,
        };
        if l != Locale::PtBr {
            return usd;
        }
        let today = state.fatura.now().date_naive();
        match state.fatura.fx_rates(Some(Currency::Brl)).await {
            Ok(rates) => rates
                .into_iter()
                .filter(|r| r.date <= today)
                .max_by_key(|r| r.date)
                .map_or(usd, |r| Fmt {
                    l,
                    cur: Currency::Brl,
                    rate: r.rate,
                    rate_date: Some(r.date),
                }),
            Err(_) => usd,
        }
    }

    /// A USD amount in the display currency.
    pub fn usd(&self, d: Decimal) -> String {
        esc(&format_money(d * self.rate, self.cur, self.l))
    }

    /// An amount in its own currency.
    pub fn money(&self, d: Decimal, c: Currency) -> String {
        esc(&format_money(d, c, self.l))
    }

    /// A count.
    pub fn int(&self, n: i64) -> String {
        format_decimal(Decimal::from(n), self.l)
    }

    /// A ratio as a percentage with one decimal.
    pub fn pct(&self, r: Option<Decimal>) -> String {
        r.map_or_else(
            || "—".into(),
            |r| {
                let mut p = (r * Decimal::from(100)).round_dp(1);
                p.rescale(1);
                format!("{}%", format_decimal(p, self.l))
            },
        )
    }

    /// A date and time (UTC).
    pub fn time(&self, t: DateTime<Utc>) -> String {
        match self.l {
            Locale::En => t.format("%Y-%m-%d %H:%M").to_string(),
            Locale::PtBr => t.format("%d/%m/%Y %H:%M").to_string(),
        }
    }

    /// A date (UTC).
    pub fn date(&self, t: DateTime<Utc>) -> String {
        match self.l {
            Locale::En => t.format("%Y-%m-%d").to_string(),
            Locale::PtBr => t.format("%d/%m/%Y").to_string(),
        }
    }

    /// A short date for chart axes.
    pub fn day(&self, t: DateTime<Utc>) -> String {
        match self.l {
            Locale::En => t.format("%m-%d").to_string(),
            Locale::PtBr => t.format("%d/%m").to_string(),
        }
    }

    /// A note naming the display currency.
    pub fn currency_note(&self) -> String {
        match self.rate_date {
            Some(d) => format!(
                "{} {} ({} USD→{} {} {})",
                tr(self.l, "amounts_in"),
                self.cur.code(),
                tr(self.l, "at_rate"),
                self.cur.code(),
                format_decimal(self.rate, self.l),
                self.date(
                    d.and_hms_opt(0, 0, 0)
                        .map_or_else(Utc::now, |n| n.and_utc())
                )
            ),
            None => format!("{} USD", tr(self.l, "amounts_in")),
        }
    }
}

// ---- layout ----------------------------------------------------------------------------

const CSS: &str = "body{font-family:system-ui,sans-serif;margin:0;color:#1b1f24;background:#f6f7f9}\
header{background:#14213d;color:#fff;padding:.6em 1.2em;display:flex;gap:1.2em;align-items:center;flex-wrap:wrap}\
header a{color:#dfe7f5;text-decoration:none}header a.on{color:#fff;font-weight:600;border-bottom:2px solid #fca311}\
header .sp{flex:1}header form{display:inline;margin:0}header button,header select{font:inherit}\
main{padding:1em 1.5em;max-width:80em}h1{font-size:1.4em}h2{font-size:1.1em;margin-top:1.6em}\
.cards{display:flex;gap:1em;flex-wrap:wrap}.card{background:#fff;border:1px solid #dde1e6;border-radius:6px;padding:.7em 1em;min-width:12em}\
.card b{display:block;font-size:1.35em;margin-top:.2em}.card small{color:#5a6270}\
table{border-collapse:collapse;background:#fff;width:100%;margin:.4em 0}td,th{border-bottom:1px solid #e3e6ea;padding:.35em .5em;text-align:left;vertical-align:top}\
td.n,th.n{text-align:right;white-space:nowrap}.warn{color:#a33}.muted{color:#6b7280}\
svg.chart{width:100%;height:260px;background:#fff;border:1px solid #dde1e6;border-radius:6px}\
.grid{display:grid;grid-template-columns:repeat(auto-fit,minmax(22em,1fr));gap:1em}\
form.login{background:#fff;border:1px solid #dde1e6;border-radius:6px;padding:1.5em;max-width:26em;margin:4em auto}\
form.login input{width:100%;padding:.4em;margin:.4em 0 1em;font:inherit;box-sizing:border-box}\
iframe{width:100%;height:40em;border:1px solid #dde1e6;background:#fff}";

/// Common page chrome: header with navigation, language switch and sign-out.
fn layout(web: &Web, fmt: &Fmt, title: &str, active: &str, back: &str, body: &str) -> Html<String> {
    let l = fmt.l;
    let csrf = esc(&web.session.csrf);
    let (nav, out_action) = match web.session.who {
        Who::Admin => (
            [
                ("/dashboard", "overview"),
                ("/dashboard/live", "live"),
                ("/dashboard/customers", "customers"),
                ("/dashboard/models", "models"),
                ("/dashboard/invoices", "invoices"),
                ("/dashboard/pricing", "pricing"),
            ]
            .iter()
            .map(|(href, key)| {
                format!(
                    "<a href=\"{href}\" data-nav=\"{key}\"{}>{}</a>",
                    if *key == active { " class=\"on\"" } else { "" },
                    tr(l, key)
                )
            })
            .collect::<String>(),
            "/logout",
        ),
        Who::Customer { .. } => (
            format!("<a href=\"/portal\" class=\"on\">{}</a>", tr(l, "portal")),
            "/portal/logout",
        ),
    };
    let lang_options = [
        (Locale::En, "English"),
        (Locale::PtBr, "Português (Brasil)"),
    ]
    .iter()
    .map(|(loc, name)| {
        format!(
            "<option value=\"{}\"{}>{name}</option>",
            loc.tag(),
            if *loc == l { " selected" } else { "" }
        )
    })
    .collect::<String>();
    Html(format!(
        "<!DOCTYPE html>\n<html lang=\"{tag}\"><head><meta charset=\"utf-8\"><meta name=\"viewport\" content=\"width=device-width\">\
<title>{title} · fatura</title><style>{CSS}</style></head><body>\
<header><strong>fatura</strong>{nav}<span class=\"sp\"></span>\
<form method=\"post\" action=\"/lang\" id=\"lang-form\"><input type=\"hidden\" name=\"csrf\" value=\"{csrf}\">\
<input type=\"hidden\" name=\"back\" value=\"{back}\"><label>{lang_label} <select name=\"lang\" id=\"lang\" \
onchange=\"this.form.submit()\">{lang_options}</select></label> <noscript><button>OK</button></noscript></form>\
<form method=\"post\" action=\"{out_action}\"><input type=\"hidden\" name=\"csrf\" value=\"{csrf}\">\
<button id=\"sign-out\">{sign_out}</button></form></header>\
<main><h1>{title}</h1>{body}</main></body></html>",
        tag = l.tag(),
        title = esc(title),
        back = esc(back),
        lang_label = tr(l, "language"),
        sign_out = tr(l, "sign_out"),
    ))
}

fn login_page(
    l: Locale,
    action: &str,
    label: &str,
    heading: &str,
    error: Option<&str>,
) -> Response {
    let csrf = random_token();
    let html = format!(
        "<!DOCTYPE html>\n<html lang=\"{tag}\"><head><meta charset=\"utf-8\"><title>{heading} · fatura</title><style>{CSS}</style></head><body>\
<form class=\"login\" method=\"post\" action=\"{action}\"><h1>fatura — {heading}</h1>{err}\
<input type=\"hidden\" name=\"csrf\" value=\"{csrf}\"><label>{label}<input type=\"password\" name=\"key\" id=\"key\" autocomplete=\"off\" required></label>\
<button id=\"sign-in\">{sign_in}</button></form></body></html>",
        tag = l.tag(),
        err = error.map_or_else(String::new, |e| format!(
            "<p class=\"warn\" id=\"error\">{}</p>",
            esc(e)
        )),
        sign_in = tr(l, "sign_in"),
    );
    (
        [(
            header::SET_COOKIE,
            set_cookie(LOGIN_CSRF_COOKIE, &csrf, 3600, false),
        )],
        Html(html),
    )
        .into_response()
}

#[derive(Debug, Deserialize)]
struct LangQuery {
    lang: Option<String>,
}

fn query_locale(q: &LangQuery) -> Locale {
    q.lang.as_deref().map_or(Locale::En, Locale::parse)
}

async fn admin_login_form(Query(q): Query<LangQuery>) -> Response {
    let l = query_locale(&q);
    login_page(l, "/login", tr(l, "admin_key"), tr(l, "overview"), None)
}

async fn portal_login_form(Query(q): Query<LangQuery>) -> Response {
    let l = query_locale(&q);
    login_page(l, "/portal/login", tr(l, "api_key"), tr(l, "portal"), None)
}

/// The sign-in form's double-submit check: the form's token equals the cookie's.
fn login_csrf_ok(headers: &HeaderMap, fields: &Fields) -> bool {
    match (cookie(headers, LOGIN_CSRF_COOKIE), fields.get("csrf")) {
        (Some(c), Some(f)) => same(c, f),
        _ => false,
    }
}

fn signed_in(headers: &HeaderMap, token: &str, to: &str) -> Response {
    let secure = over_tls(headers);
    let mut r = Redirect::to(to).into_response();
    r.headers_mut().append(
        header::SET_COOKIE,
        set_cookie(SESSION_COOKIE, token, SESSION_TTL.as_secs(), secure),
    );
    r.headers_mut().append(
        header::SET_COOKIE,
        set_cookie(LOGIN_CSRF_COOKIE, "", 0, secure),
    );
    r
}

async fn admin_login(
    State(state): State<AppState>,
    headers: HeaderMap,
    axum::Form(fields): axum::Form<Fields>,
) -> Response {
    if !login_csrf_ok(&headers, &fields) {
        return forbidden();
    }
    let key = fields.get("key").map(String::as_str).unwrap_or_default();
    let digest = hash_api_key(key);
    if key.is_empty() || !bool::from(digest.as_bytes().ct_eq(state.admin_key_hash.as_bytes())) {
        let mut r = login_page(
            Locale::En,
            "/login",
            tr(Locale::En, "admin_key"),
            tr(Locale::En, "overview"),
            Some("Wrong admin key."),
        );
        *r.status_mut() = StatusCode::UNAUTHORIZED;
        return r;
    }
    let token = state.sessions.create(Who::Admin, Locale::En);
    signed_in(&headers, &token, "/dashboard")
}

async fn portal_login(
    State(state): State<AppState>,
    headers: HeaderMap,
    axum::Form(fields): axum::Form<Fields>,
) -> Response {
    if !login_csrf_ok(&headers, &fields) {
        return forbidden();
    }
    let key = fields.get("key").map(String::as_str).unwrap_or_default();
    let digest = hash_api_key(key);
    let found = if key.is_empty() {
        None
    } else {
        state.fatura.verify_key(&digest).await.ok().flatten()
    };
    let Some(k) = found else {
        let mut r = login_page(
            Locale::En,
            "/portal/login",
            tr(Locale::En, "api_key"),
            tr(Locale::En, "portal"),
            Some("Unknown or revoked API key."),
        );
        *r.status_mut() = StatusCode::UNAUTHORIZED;
        return r;
    };
    let locale = state
        .fatura
        .customer(&k.customer_id)
        .await
        .map_or(Locale::En, |c| Locale::parse(&c.billing.locale));
    let token = state.sessions.create(
        Who::Customer {
            customer_id: k.customer_id,
            key_hash: digest,
        },
        locale,
    );
    signed_in(&headers, &token, "/portal")
}

async fn logout(
    State(state): State<AppState>,
    headers: HeaderMap,
    axum::Form(fields): axum::Form<Fields>,
) -> Response {
    let Some(token) = cookie(&headers, SESSION_COOKIE) else {
        return Redirect::to("/login").into_response();
    };
    let Some(session) = state.sessions.get(token) else {
        return Redirect::to("/login").into_response();
    };
    let web = Web {
        session,
        token: token.to_string(),
    };
    if !csrf_ok(&web, &fields) {
        return forbidden();
    }
    state.sessions.remove(token);
    let to = match web.session.who {
        Who::Admin => "/login",
        Who::Customer { .. } => "/portal/login",
    };
    let mut r = Redirect::to(to).into_response();
    r.headers_mut().append(
        header::SET_COOKIE,
        set_cookie(SESSION_COOKIE, "", 0, over_tls(&headers)),
    );
    r
}

async fn set_lang(
    State(state): State<AppState>,
    headers: HeaderMap,
    axum::Form(fields): axum::Form<Fields>,
) -> Response {
    let Some(token) = cookie(&headers, SESSION_COOKIE) else {
        return forbidden();
    };
    let Some(session) = state.sessions.get(token) else {
        return forbidden();
    };
    let web = Web {
        session,
        token: token.to_string(),
    };
    if !csrf_ok(&web, &fields) {
        return forbidden();
    }
    let locale = Locale::parse(fields.get("lang").map(String::as_str).unwrap_or_default());
    state.sessions.set_locale(token, locale);
    // Back to the page the form was on (a local path only).
    let back = fields
        .get("back")
        .filter(|b| b.starts_with('/') && !b.starts_with("//") && !b.contains('\\'))
        .cloned()
        .unwrap_or_else(|| "/".into());
    Redirect::to(&back).into_response()
}

async fn root() -> Redirect {
    Redirect::to("/dashboard")
}

/// The web routes.
pub fn router() -> Router<AppState> {
    Router::new()
        .route("/", get(root))
        .route("/login", get(admin_login_form).post(admin_login))
        .route("/logout", post(logout))
        .route("/lang", post(set_lang))
        .route("/dashboard", get(dash::overview))
        .route("/dashboard/live", get(dash::live))
        .route("/dashboard/live/stream", get(dash::live_stream))
        .route("/dashboard/customers", get(dash::customers))
        .route("/dashboard/customers/{id}", get(dash::customer))
        .route("/dashboard/models", get(dash::models))
        .route("/dashboard/invoices", get(dash::invoices))
        .route("/dashboard/invoices/{id}", get(dash::invoice))
        .route(
            "/dashboard/invoices/{id}/document",
            get(dash::invoice_document),
        )
        .route("/dashboard/pricing", get(dash::pricing))
        .route("/portal", get(portal::home))
        .route("/portal/login", get(portal_login_form).post(portal_login))
        .route("/portal/logout", post(logout))
        .route("/portal/invoices/{id}", get(portal::invoice))
}
