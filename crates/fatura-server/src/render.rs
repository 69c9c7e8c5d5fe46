//! Locale-aware formatting and the customer-facing renderings of an invoice (HTML and CSV).
//! Operator-only figures (upstream cost, margin) are never rendered here.

use chrono::{DateTime, Utc};
use chrono_tz::Tz;
use fatura_core::Currency;
use fatura_core::status::InvoiceKind;
use rust_decimal::Decimal;

use crate::service::{DocSection, InvoiceDocument};
use fatura_store::InvoiceRecord;

/// A supported language.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Locale {
    /// English.
    En,
    /// Brazilian Portuguese.
    PtBr,
}

impl Locale {
    /// `pt-BR` (any case, `pt_BR`, `pt`) or English.
    pub fn parse(s: &str) -> Locale {
        match s.to_ascii_lowercase().replace('_', "-").as_str() {
            "pt-br" | "pt" => Locale::PtBr,
            _ => Locale::En,
        }
    }

    /// The BCP 47 tag.
    pub fn tag(self) -> &'static str {
        match self {
            Locale::En => "en",
            Locale::PtBr => "pt-BR",
        }
    }

    fn separators(self) -> (char, char) {
        match self {
            Locale::En => (',', '.'),
            Locale::PtBr => ('.', ','),
        }
    }

    /// Translates a label.
    pub fn t(self, key: &'static str) -> &'static str {
        if self == Locale::En {
            return match key {
                "invoice" => "Invoice",
                "credit_note" => "Credit note",
                "draft" => "Draft",
                "open" => "Open",
                "paid" => "Paid",
                "void" => "Void",
                "number" => "Number",
                "status" => "Status",
                "customer" => "Customer",
                "period" => "Period",
                "issued" => "Issued",
                "due" => "Due",
                "usage" => "Usage",
                "adjustment" => "Late usage of an earlier period (adjustment)",
                "plan" => "Plan",
                "default_plan" => "Default plan",
                "fx_rate" => "Exchange rate USD→",
                "model" => "Model",
                "quantity" => "Quantity",
                "unit_price" => "Unit price",
                "subtotal" => "Subtotal",
                "discount" => "Volume discount",
                "floor" => "Minimum price adjustment",
                "amount" => "Amount",
                "prompt" => "Input tokens",
                "cached" => "Cached input tokens",
                "completion" => "Output tokens",
                "reasoning" => "Reasoning tokens",
                "requests" => "Requests",
                "per_million" => "per 1M",
                "per_request" => "per request",
                "tiers" => "Volume tiers",
                "tier_units" => "Units",
                "included_credits" => "Included credits",
                "minimum" => "Monthly minimum adjustment",
                "section_total" => "Section total",
                "tax" => "Tax",
                "total" => "Total",
                "prepaid_applied" => "Paid from prepaid balance",
                "amount_due" => "Amount due",
                "reason" => "Reason",
                "corrects" => "Corrects invoice",
                "unpriced" => "Events without a price yet (billed once priced)",
                "up_to" => "up to",
                "and_above" => "and above",
                _ => key,
            };
        }
        match key {
            "invoice" => "Fatura",
            "credit_note" => "Nota de crédito",
            "draft" => "Rascunho",
            "open" => "Em aberto",
            "paid" => "Paga",
            "void" => "Cancelada",
            "number" => "Número",
            "status" => "Situação",
            "customer" => "Cliente",
            "period" => "Período",
            "issued" => "Emitida em",
            "due" => "Vencimento",
            "usage" => "Uso",
            "adjustment" => "Uso tardio de um período anterior (ajuste)",
            "plan" => "Plano",
            "default_plan" => "Plano padrão",
            "fx_rate" => "Câmbio USD→",
            "model" => "Modelo",
            "quantity" => "Quantidade",
            "unit_price" => "Preço unitário",
            "subtotal" => "Subtotal",
            "discount" => "Desconto por volume",
            "floor" => "Ajuste de preço mínimo",
            "amount" => "Valor",
            "prompt" => "Tokens de entrada",
            "cached" => "Tokens de entrada em cache",
            "completion" => "Tokens de saída",
            "reasoning" => "Tokens de raciocínio",
            "requests" => "Requisições",
            "per_million" => "por 1M",
            "per_request" => "por requisição",
            "tiers" => "Faixas de volume",
            "tier_units" => "Unidades",
            "included_credits" => "Créditos incluídos",
            "minimum" => "Ajuste de mínimo mensal",
            "section_total" => "Total da seção",
            "tax" => "Imposto",
            "total" => "Total",
            "prepaid_applied" => "Pago com saldo pré-pago",
            "amount_due" => "Valor a pagar",
            "reason" => "Motivo",
            "corrects" => "Corrige a fatura",
            "unpriced" => "Eventos ainda sem preço (cobrados quando precificados)",
            "up_to" => "até",
            "and_above" => "acima",
            _ => key,
        }
    }
}

fn group(int: &str, sep: char) -> String {
    let digits: Vec<char> = int.chars().collect();
    let mut out = String::new();
    for (i, c) in digits.iter().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(sep);
        }
        out.push(*c);
    }
    out
}

/// A decimal with the locale's separators, keeping its scale (`1234.5` → `1,234.5` /
/// `1.234,5`).
pub fn format_decimal(d: Decimal, locale: Locale) -> String {
    let (thousands, decimal) = locale.separators();
    let s = d.abs().to_string();
    let (int, frac) = s.split_once('.').unwrap_or((&s, ""));
    let mut out = String::new();
    if d.is_sign_negative() && !d.is_zero() {
        out.push('-');
    }
    out.push_str(&group(int, thousands));
    if !frac.is_empty() {
        out.push(decimal);
        out.push_str(frac);
    }
    out
}

/// Money with its symbol, rounded display to minor units: `R$ 1.234,56`, `$1,234.56`,
/// `€ 1.234,56`.
pub fn format_money(amount: Decimal, currency: Currency, locale: Locale) -> String {
    let mut a = amount.round_dp(currency.minor_units());
    a.rescale(currency.minor_units());
    let n = format_decimal(a.abs(), locale);
    let sign = if a.is_sign_negative() && !a.is_zero() {
        "-"
    } else {
        ""
    };
    match (currency, locale) {
        (Currency::Usd, Locale::En) => format!("{sign}${n}"),
        (Currency::Usd, Locale::PtBr) => format!("{sign}US$ {n}"),
        (Currency::Brl, _) => format!("{sign}R$ {n}"),
        (Currency::Eur, Locale::En) => format!("{sign}€{n}"),
        (Currency::Eur, Locale::PtBr) => format!("{sign}€ {n}"),
    }
}

/// A date in the customer's time zone: `2026-11-01` / `01/11/2026`.
pub fn format_date(t: DateTime<Utc>, tz: &str, locale: Locale) -> String {
    let tz: Tz = tz.parse().unwrap_or(Tz::UTC);
    let local = t.with_timezone(&tz);
    match locale {
        Locale::En => local.format("%Y-%m-%d").to_string(),
        Locale::PtBr => local.format("%d/%m/%Y").to_string(),
    }
}

/// Escapes text for HTML.
pub fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

fn section_html(out: &mut String, s: &DocSection, inv: &InvoiceRecord, l: Locale, tz: &str) {
    let money = |d: Decimal| esc(&format_money(d, inv.currency, l));
    let title = if s.kind == "adjustment" {
        l.t("adjustment")
    } else {
        l.t("usage")
    };
    let plan = match (&s.plan_id, s.plan_version) {
        (Some(p), Some(v)) => format!("{} {} v{}", l.t("plan"), esc(p), v),
        _ => l.t("default_plan").to_string(),
    };
    out.push_str(&format!(
        "<section class=\"{}\"><h2>{} — {} – {}</h2><p>{}",
        esc(&s.kind),
        title,
        format_date(s.from, tz, l),
        format_date(s.to - chrono::Duration::microseconds(1), tz, l),
        plan
    ));
    if inv.currency != Currency::Usd {
        out.push_str(&format!(
            " · {}{} {}",
            l.t("fx_rate"),
            inv.currency,
            format_decimal(s.fx_rate, l)
        ));
    }
    out.push_str("</p>\n<table><thead><tr>");
    for h in [
        "model",
        "quantity",
        "unit_price",
        "subtotal",
        "discount",
        "floor",
        "amount",
    ] {
        out.push_str(&format!("<th>{}</th>", l.t(h)));
    }
    out.push_str("</tr></thead><tbody>\n");
    for line in &s.lines {
        let q = &line.quantities;
        let u = &line.unit_prices;
        let rows: Vec<(&str, u64, Option<Decimal>, &str)> = vec![
            ("prompt", q.prompt_tokens, u.prompt, "per_million"),
            ("cached", q.cached_tokens, u.cached, "per_million"),
            (
                "completion",
                q.completion_tokens,
                u.completion,
                "per_million",
            ),
            ("reasoning", q.reasoning_tokens, u.reasoning, "per_million"),
            ("requests", q.requests, u.request, "per_request"),
        ];
        let qty: Vec<String> = rows
            .iter()
            .filter(|r| r.1 > 0)
            .map(|r| format!("{} {}", format_decimal(Decimal::from(r.1), l), l.t(r.0)))
            .collect();
        let prices: Vec<String> = rows
            .iter()
            .filter_map(|r| {
                r.2.map(|p| {
                    format!(
                        "{} {}",
                        esc(&format_money_unit(p, inv.currency, l)),
                        l.t(r.3)
                    )
                })
            })
            .collect();
        out.push_str(&format!(
            "<tr><td>{}<br><small>{}</small></td><td>{}</td><td>{}</td><td class=\"n\">{}</td><td class=\"n\">{}</td><td class=\"n\">{}</td><td class=\"n\">{}</td></tr>\n",
            esc(&line.model),
            esc(&line.provider),
            qty.join("<br>"),
            prices.join("<br>"),
            money(line.subtotal),
            if line.discount.is_zero() { String::new() } else { format!("-{}", money(line.discount)) },
            if line.floor_adjustment.is_zero() { String::new() } else { money(line.floor_adjustment) },
            money(line.amount)
        ));
    }
    out.push_str("</tbody></table>\n");
    if !s.tiers.is_empty() {
        out.push_str(&format!("<h3>{}</h3><table><tbody>\n", l.t("tiers")));
        for t in &s.tiers {
            let bound = match t.up_to {
                Some(b) => format!("{} {}", l.t("up_to"), format_decimal(b, l)),
                None => l.t("and_above").to_string(),
            };
            out.push_str(&format!(
                "<tr><td>{}</td><td class=\"n\">{}%</td><td class=\"n\">{} {}</td></tr>\n",
                bound,
                format_decimal((t.discount * Decimal::from(100)).normalize(), l),
                format_decimal(t.units, l),
                l.t("tier_units")
            ));
        }
        out.push_str("</tbody></table>\n");
    }
    out.push_str("<table class=\"sum\"><tbody>\n");
    if !s.included_credits_applied.is_zero() {
        out.push_str(&format!(
            "<tr><td>{}</td><td class=\"n\">-{}</td></tr>\n",
            l.t("included_credits"),
            money(s.included_credits_applied)
        ));
    }
    if !s.minimum_adjustment.is_zero() {
        out.push_str(&format!(
            "<tr><td>{}</td><td class=\"n\">{}</td></tr>\n",
            l.t("minimum"),
            money(s.minimum_adjustment)
        ));
    }
    out.push_str(&format!(
        "<tr><th>{}</th><td class=\"n\">{}</td></tr>\n</tbody></table></section>\n",
        l.t("section_total"),
        money(s.total)
    ));
}

/// Unit prices keep up to 6 decimals.
fn format_money_unit(amount: Decimal, currency: Currency, l: Locale) -> String {
    let n = format_decimal(amount.normalize(), l);
    match currency {
        Currency::Usd if l == Locale::En => format!("${n}"),
        Currency::Usd => format!("US$ {n}"),
        Currency::Brl => format!("R$ {n}"),
        Currency::Eur => format!("€ {n}"),
    }
}

/// The printable invoice (or credit note) in the customer's language.
pub fn invoice_html(inv: &InvoiceRecord, doc: &InvoiceDocument) -> String {
    let l = Locale::parse(&doc.locale);
    let tz = doc.timezone.as_str();
    let money = |d: Decimal| esc(&format_money(d, inv.currency, l));
    let kind = if inv.kind == InvoiceKind::CreditNote {
        l.t("credit_note")
    } else {
        l.t("invoice")
    };
    let number = inv
        .number
        .clone()
        .unwrap_or_else(|| l.t("draft").to_string());
    let mut out = String::new();
    out.push_str(&format!(
        "<!DOCTYPE html>\n<html lang=\"{}\"><head><meta charset=\"utf-8\"><title>{} {}</title>\n<style>body{{font-family:system-ui,sans-serif;max-width:60em;margin:2em auto;color:#111}}table{{border-collapse:collapse;width:100%;margin:.5em 0}}td,th{{border-bottom:1px solid #ddd;padding:.3em;text-align:left;vertical-align:top}}.n{{text-align:right;white-space:nowrap}}small{{color:#666}}@media print{{body{{margin:0}}}}</style></head><body>\n",
        l.tag(),
        kind,
        esc(&number)
    ));
    out.push_str(&format!(
        "<h1>{} {}</h1>\n<table class=\"meta\"><tbody>\n",
        kind,
        esc(&number)
    ));
    let mut meta = vec![
        (l.t("customer"), esc(&doc.customer_name)),
        (
            l.t("status"),
            l.t(match inv.status.as_str() {
                "draft" => "draft",
                "paid" => "paid",
                "void" => "void",
                _ => "open",
            })
            .to_string(),
        ),
        (
            l.t("period"),
            format!(
                "{} – {}",
                format_date(inv.period_start, tz, l),
                format_date(inv.period_end - chrono::Duration::microseconds(1), tz, l)
            ),
        ),
    ];
    if let Some(f) = inv.finalized_at {
        meta.push((l.t("issued"), format_date(f, tz, l)));
    }
    if let Some(d) = inv.due_at {
        meta.push((l.t("due"), format_date(d, tz, l)));
    }
    if let Some(c) = &doc.corrects_number {
        meta.push((l.t("corrects"), esc(c)));
    }
    if let Some(r) = &doc.reason {
        meta.push((l.t("reason"), esc(r)));
    }
    for (k, v) in meta {
        out.push_str(&format!("<tr><th>{k}</th><td>{v}</td></tr>\n"));
    }
    out.push_str("</tbody></table>\n");
    for s in &doc.sections {
        section_html(&mut out, s, inv, l, tz);
    }
    out.push_str("<table class=\"totals\"><tbody>\n");
    let mut totals = vec![(l.t("subtotal"), money(inv.subtotal))];
    if let Some(rate) = doc.tax_rate {
        totals.push((
            l.t("tax"),
            format!(
                "{} ({}%)",
                money(inv.tax),
                format_decimal((rate * Decimal::from(100)).normalize(), l)
            ),
        ));
    }
    totals.push((l.t("total"), money(inv.total)));
    if !inv.prepaid_applied.is_zero() {
        totals.push((
            l.t("prepaid_applied"),
            format!("-{}", money(inv.prepaid_applied)),
        ));
    }
    if inv.kind == InvoiceKind::Invoice {
        totals.push((l.t("amount_due"), money(inv.amount_due)));
    }
    for (k, v) in totals {
        out.push_str(&format!("<tr><th>{k}</th><td class=\"n\">{v}</td></tr>\n"));
    }
    out.push_str("</tbody></table>\n");
    if doc.unpriced_events > 0 {
        out.push_str(&format!(
            "<p><small>{}: {}</small></p>\n",
            l.t("unpriced"),
            doc.unpriced_events
        ));
    }
    out.push_str("</body></html>\n");
    out
}

fn csv_field(s: &str) -> String {
    if s.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_string()
    }
}

/// The invoice's line items as CSV (RFC 4180, `.`-decimal amounts in the invoice currency).
pub fn invoice_csv(inv: &InvoiceRecord, doc: &InvoiceDocument) -> String {
    let mut out = String::from(
        "invoice,section,period_from,period_to,plan_id,plan_version,provider,model,events,prompt_tokens,cached_tokens,\
         completion_tokens,reasoning_tokens,requests,unit_price_prompt_per_1m,unit_price_cached_per_1m,\
         unit_price_completion_per_1m,unit_price_reasoning_per_1m,unit_price_per_request,currency,fx_rate,subtotal,\
         discount,floor_adjustment,amount\r\n",
    );
    let number = inv.number.clone().unwrap_or_else(|| inv.id.clone());
    let opt = |d: Option<Decimal>| d.map(|d| d.normalize().to_string()).unwrap_or_default();
    for s in &doc.sections {
        for l in &s.lines {
            let q = &l.quantities;
            let u = &l.unit_prices;
            let fields = [
                number.clone(),
                s.kind.clone(),
                s.from.to_rfc3339(),
                s.to.to_rfc3339(),
                s.plan_id.clone().unwrap_or_default(),
                s.plan_version.map(|v| v.to_string()).unwrap_or_default(),
                l.provider.clone(),
                l.model.clone(),
                l.events.to_string(),
                q.prompt_tokens.to_string(),
                q.cached_tokens.to_string(),
                q.completion_tokens.to_string(),
                q.reasoning_tokens.to_string(),
                q.requests.to_string(),
                opt(u.prompt),
                opt(u.cached),
                opt(u.completion),
                opt(u.reasoning),
                opt(u.request),
                inv.currency.code().to_string(),
                s.fx_rate.normalize().to_string(),
                l.subtotal.to_string(),
                l.discount.to_string(),
                l.floor_adjustment.to_string(),
                l.amount.to_string(),
            ];
            let row: Vec<String> = fields.iter().map(|f| csv_field(f)).collect();
            out.push_str(&row.join(","));
            out.push_str("\r\n");
        }
    }
    out
}

#[cfg(test)]
mod tests;
