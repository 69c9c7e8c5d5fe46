//! Charts for the dashboard, drawn as SVG on the server by `plotters`.
//!
//! Money stays decimal everywhere else; here values become `f64` only to place pixels.

use chrono::{DateTime, Utc};
use plotters::prelude::*;
use rust_decimal::Decimal;
use rust_decimal::prelude::ToPrimitive;

/// One line of a chart.
pub struct Series<'a> {
    /// Legend.
    pub label: &'a str,
    /// Colour (RGB).
    pub color: (u8, u8, u8),
    /// Points (day, value).
    pub points: Vec<(DateTime<Utc>, Decimal)>,
    /// Dashed-looking (drawn thinner and lighter), e.g. a forecast.
    pub light: bool,
}

/// A band (lower, upper) drawn under the lines, e.g. a forecast's 80% interval.
pub struct Band {
    /// Points (day, lower, upper).
    pub points: Vec<(DateTime<Utc>, Decimal, Decimal)>,
    /// Colour (RGB).
    pub color: (u8, u8, u8),
}

fn f(d: Decimal) -> f64 {
    d.to_f64().unwrap_or(0.0)
}

/// A daily line chart as an `<svg>` element; `fmt_y` formats the axis values (money in the
/// viewer's locale). Empty input draws empty axes.
pub fn daily_lines(
    series: &[Series<'_>],
    band: Option<&Band>,
    fmt_y: &dyn Fn(f64) -> String,
    fmt_x: &dyn Fn(DateTime<Utc>) -> String,
) -> String {
    let mut svg = String::new();
    if let Err(e) = draw(&mut svg, series, band, fmt_y, fmt_x) {
        tracing::warn!(error = %e, "chart drawing failed");
        return String::new();
    }
    // The backend writes a fixed-size document; let the page scale it.
    svg.replacen(
        "<svg ",
        "<svg class=\"chart\" preserveAspectRatio=\"none\" ",
        1,
    )
}

fn draw(
    svg: &mut String,
    series: &[Series<'_>],
    band: Option<&Band>,
    fmt_y: &dyn Fn(f64) -> String,
    fmt_x: &dyn Fn(DateTime<Utc>) -> String,
) -> Result<(), String> {
    let days = series
        .iter()
        .flat_map(|s| s.points.iter().map(|p| p.0))
        .chain(band.into_iter().flat_map(|b| b.points.iter().map(|p| p.0)));
    let (mut x0, mut x1) = (None::<DateTime<Utc>>, None::<DateTime<Utc>>);
    for d in days {
        x0 = Some(x0.map_or(d, |x| x.min(d)));
        x1 = Some(x1.map_or(d, |x| x.max(d)));
    }
    let now = Utc::now();
    let (x0, x1) = (x0.unwrap_or(now), x1.unwrap_or(now));
    let span = ((x1 - x0).num_days() as f64).max(1.0);
    let x_of = |d: DateTime<Utc>| (d - x0).num_days() as f64;
    let y_max = series
        .iter()
        .flat_map(|s| s.points.iter().map(|p| f(p.1)))
        .chain(
            band.into_iter()
                .flat_map(|b| b.points.iter().map(|p| f(p.2))),
        )
        .fold(0.0_f64, f64::max)
        .max(1e-9)
        * 1.1;
    let root = SVGBackend::with_string(svg, (900, 260)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| e.to_string())?;
    let mut chart = ChartBuilder::on(&root)
        .margin(8)
        .x_label_area_size(26)
        .y_label_area_size(80)
        .build_cartesian_2d(0.0..span, 0.0..y_max)
        .map_err(|e| e.to_string())?;
    chart
        .configure_mesh()
        .x_labels(8)
        .y_labels(5)
        .x_label_formatter(&|x| fmt_x(x0 + chrono::Duration::days(x.round() as i64)))
        .y_label_formatter(&|y| fmt_y(*y))
        .light_line_style(RGBColor(240, 240, 240))
        .draw()
        .map_err(|e| e.to_string())?;
    if let Some(b) = band {
        let c = RGBColor(b.color.0, b.color.1, b.color.2);
        let upper: Vec<(f64, f64)> = b.points.iter().map(|p| (x_of(p.0), f(p.2))).collect();
        let lower: Vec<(f64, f64)> = b.points.iter().rev().map(|p| (x_of(p.0), f(p.1))).collect();
        let polygon: Vec<(f64, f64)> = upper.into_iter().chain(lower).collect();
        chart
            .draw_series(std::iter::once(Polygon::new(polygon, c.mix(0.2).filled())))
            .map_err(|e| e.to_string())?;
    }
    for s in series {
        let c = RGBColor(s.color.0, s.color.1, s.color.2);
        let style = if s.light {
            c.mix(0.6).stroke_width(1)
        } else {
            c.stroke_width(2)
        };
        chart
            .draw_series(LineSeries::new(
                s.points.iter().map(|p| (x_of(p.0), f(p.1))),
                style,
            ))
            .map_err(|e| e.to_string())?
            .label(s.label)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], c.stroke_width(2)));
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .background_style(WHITE.mix(0.85))
        .border_style(RGBColor(200, 200, 200))
        .draw()
        .map_err(|e| e.to_string())?;
    root.present().map_err(|e| e.to_string())?;
    Ok(())
}
