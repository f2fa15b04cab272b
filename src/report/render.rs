//! The processing report as Markdown and as a self-contained HTML page
//! whose chart is inline SVG (no script, nothing fetched): it opens from a
//! file or an e-mail as it is.

use std::fmt::Write;

use super::{DayRow, ProcessingReport};

/// Markdown tables, one per part.
pub fn markdown(report: &ProcessingReport) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "# Records of processing\n");
    let _ = writeln!(
        out,
        "Generated {}. {}\n",
        report.generated,
        period_text(report)
    );
    for (title, table) in tables(report) {
        let _ = writeln!(out, "## {title}\n");
        if table.rows.is_empty() {
            let _ = writeln!(out, "None.\n");
            continue;
        }
        let _ = writeln!(out, "| {} |", table.head.join(" | "));
        let _ = writeln!(
            out,
            "|{}|",
            table
                .head
                .iter()
                .map(|_| "---")
                .collect::<Vec<_>>()
                .join("|")
        );
        for row in &table.rows {
            let cells: Vec<String> = row.iter().map(|c| c.replace('|', "\\|")).collect();
            let _ = writeln!(out, "| {} |", cells.join(" | "));
        }
        out.push('\n');
    }
    out
}

/// One HTML page: the chart of values revealed per day and purpose, then
/// the same tables as the Markdown form.
pub fn html(report: &ProcessingReport) -> String {
    let mut out = String::new();
    out.push_str(
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\n\
         <title>Records of processing</title>\n<style>\n\
         body{font-family:sans-serif;margin:2em;color:#222}\n\
         table{border-collapse:collapse;margin-bottom:1.5em}\n\
         th,td{border:1px solid #bbb;padding:.25em .6em;text-align:left}\n\
         td.n{text-align:right}\n\
         </style></head><body>\n",
    );
    let _ = writeln!(out, "<h1>Records of processing</h1>");
    let _ = writeln!(
        out,
        "<p>Generated {}. {}</p>",
        escape(&report.generated),
        escape(&period_text(report))
    );
    let _ = writeln!(out, "<h2>Values revealed per day and purpose</h2>");
    out.push_str(&chart(&report.reveals_per_day));
    for (title, table) in tables(report) {
        let _ = writeln!(out, "<h2>{}</h2>", escape(title));
        if table.rows.is_empty() {
            let _ = writeln!(out, "<p>None.</p>");
            continue;
        }
        out.push_str("<table><tr>");
        for head in &table.head {
            let _ = write!(out, "<th>{}</th>", escape(head));
        }
        out.push_str("</tr>\n");
        for row in &table.rows {
            out.push_str("<tr>");
            for cell in row {
                let class = if !cell.is_empty() && cell.chars().all(|c| c.is_ascii_digit()) {
                    " class=\"n\""
                } else {
                    ""
                };
                let _ = write!(out, "<td{class}>{}</td>", escape(cell));
            }
            out.push_str("</tr>\n");
        }
        out.push_str("</table>\n");
    }
    out.push_str("</body></html>\n");
    out
}

/// Colours for the purposes, in order (purposes past the last reuse them).
const COLOURS: [&str; 8] = [
    "#4e79a7", "#f28e2b", "#59a14f", "#e15759", "#76b7b2", "#edc948", "#b07aa1", "#9c755f",
];

/// A grouped bar chart: one group per day, one bar per purpose. Every bar
/// carries its day, purpose and count as data attributes and a tooltip, so
/// that what the chart shows can be checked against the JSON.
fn chart(rows: &[DayRow]) -> String {
    if rows.is_empty() {
        return "<p>No values were revealed in the period.</p>\n".into();
    }
    let mut days: Vec<&str> = rows.iter().map(|r| r.day.as_str()).collect();
    days.dedup();
    let mut purposes: Vec<&str> = rows.iter().map(|r| r.purpose.as_str()).collect();
    purposes.sort_unstable();
    purposes.dedup();
    let max = rows.iter().map(|r| r.values).max().unwrap_or(1).max(1);
    let (bar, gap, height, left, top, bottom) = (18.0, 14.0, 200.0, 60.0, 20.0, 40.0);
    let group = bar * purposes.len() as f64 + gap;
    // Wide enough for the bars and for the legend's longest name.
    let longest = purposes
        .iter()
        .map(|p| p.chars().count())
        .max()
        .unwrap_or(0);
    let width = (left + group * days.len() as f64 + 20.0)
        .max(left + 18.0 + 7.5 * longest as f64 + 10.0)
        .max(300.0);
    let legend_y = top + height + bottom;
    let total_height = legend_y + 20.0 * purposes.len() as f64 + 10.0;
    let mut svg = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" id=\"reveals-chart\" width=\"{width:.0}\" height=\"{total_height:.0}\" role=\"img\" aria-label=\"Values revealed per day and purpose\">\n"
    );
    let _ = writeln!(
        svg,
        "<line x1=\"{left}\" y1=\"{top}\" x2=\"{left}\" y2=\"{y}\" stroke=\"#333\"/><line x1=\"{left}\" y1=\"{y}\" x2=\"{x}\" y2=\"{y}\" stroke=\"#333\"/>",
        y = top + height,
        x = width - 10.0
    );
    let _ = writeln!(
        svg,
        "<text x=\"{x}\" y=\"{y}\" font-size=\"11\" text-anchor=\"end\">{max}</text><text x=\"{x}\" y=\"{y0}\" font-size=\"11\" text-anchor=\"end\">0</text>",
        x = left - 6.0,
        y = top + 4.0,
        y0 = top + height
    );
    for (d, day) in days.iter().enumerate() {
        let x0 = left + gap / 2.0 + group * d as f64;
        for row in rows.iter().filter(|r| r.day == *day) {
            let p = purposes.iter().position(|p| *p == row.purpose).unwrap_or(0);
            let h = height * row.values as f64 / max as f64;
            let _ = writeln!(
                svg,
                "<rect class=\"bar\" data-day=\"{day}\" data-purpose=\"{purpose}\" data-values=\"{values}\" x=\"{x:.1}\" y=\"{y:.1}\" width=\"{bar}\" height=\"{h:.1}\" fill=\"{colour}\"><title>{day}, {purpose}: {values}</title></rect>",
                day = escape(day),
                purpose = escape(&row.purpose),
                values = row.values,
                x = x0 + bar * p as f64,
                y = top + height - h,
                colour = COLOURS[p % COLOURS.len()],
            );
        }
        let _ = writeln!(
            svg,
            "<text x=\"{x:.1}\" y=\"{y}\" font-size=\"11\" text-anchor=\"middle\">{day}</text>",
            x = x0 + bar * purposes.len() as f64 / 2.0,
            y = top + height + 16.0,
            day = escape(day)
        );
    }
    for (p, purpose) in purposes.iter().enumerate() {
        let y = legend_y + 20.0 * p as f64;
        let _ = writeln!(
            svg,
            "<rect x=\"{left}\" y=\"{ry}\" width=\"12\" height=\"12\" fill=\"{colour}\"/><text x=\"{tx}\" y=\"{y}\" font-size=\"12\">{purpose}</text>",
            ry = y - 10.0,
            colour = COLOURS[p % COLOURS.len()],
            tx = left + 18.0,
            purpose = escape(purpose)
        );
    }
    svg.push_str("</svg>\n");
    svg
}

fn period_text(report: &ProcessingReport) -> String {
    let bound = |b: &Option<String>, open: &str| b.clone().unwrap_or_else(|| open.into());
    format!(
        "Audit events {}..{} ({} events), from {} to {}.",
        report.audit.first_seq,
        report.audit.last_seq,
        report.audit.events,
        bound(&report.period.since, "the start of the trail"),
        bound(&report.period.until, "the report's time")
    )
}

struct Table {
    head: Vec<&'static str>,
    rows: Vec<Vec<String>>,
}

fn table(head: &[&'static str], rows: Vec<Vec<String>>) -> Table {
    Table {
        head: head.to_vec(),
        rows,
    }
}

/// The report's parts as tables, in the order both forms show them.
fn tables(r: &ProcessingReport) -> Vec<(&'static str, Table)> {
    let list = |items: &[String]| {
        if items.is_empty() {
            "-".to_owned()
        } else {
            items.join(", ")
        }
    };
    vec![
        (
            "Field types",
            table(
                &[
                    "field type",
                    "kind",
                    "retention (days)",
                    "consent purposes",
                    "values held",
                ],
                r.field_types
                    .iter()
                    .map(|f| {
                        vec![
                            f.name.clone(),
                            f.kind.clone(),
                            f.retention_days
                                .map_or_else(|| "-".into(), |d| d.to_string()),
                            list(&f.consent_purposes),
                            f.values_held.to_string(),
                        ]
                    })
                    .collect(),
            ),
        ),
        (
            "Purposes",
            table(
                &["purpose", "description", "legal basis"],
                r.purposes
                    .iter()
                    .map(|p| vec![p.name.clone(), p.description.clone(), p.legal_basis.clone()])
                    .collect(),
            ),
        ),
        (
            "Identities in the policy",
            table(
                &["identity", "scopes", "purposes"],
                r.identities
                    .iter()
                    .map(|i| vec![i.identity.clone(), list(&i.scopes), list(&i.purposes)])
                    .collect(),
            ),
        ),
        (
            "Reveals (calls) per identity, field type and purpose",
            table(
                &["identity", "field type", "purpose", "calls"],
                r.reveals
                    .iter()
                    .map(|x| {
                        vec![
                            x.identity.clone(),
                            x.field_type.clone(),
                            x.purpose.clone(),
                            x.calls.to_string(),
                        ]
                    })
                    .collect(),
            ),
        ),
        (
            "Values revealed per day and purpose",
            table(
                &["day", "purpose", "values"],
                r.reveals_per_day
                    .iter()
                    .map(|d| vec![d.day.clone(), d.purpose.clone(), d.values.to_string()])
                    .collect(),
            ),
        ),
        (
            "Refusals",
            table(
                &["identity", "method", "outcome", "purpose", "calls"],
                r.refusals
                    .iter()
                    .map(|x| {
                        vec![
                            x.identity.clone(),
                            x.method.clone(),
                            x.outcome.clone(),
                            x.purpose.clone(),
                            x.calls.to_string(),
                        ]
                    })
                    .collect(),
            ),
        ),
        (
            "Data subjects' rights served",
            table(
                &["exports", "erasures", "rectifications", "access histories"],
                vec![vec![
                    r.rights.exports.to_string(),
                    r.rights.erasures.to_string(),
                    r.rights.rectifications.to_string(),
                    r.rights.access_histories.to_string(),
                ]],
            ),
        ),
        (
            "Consent changes",
            table(
                &["purpose", "granted", "withdrawn"],
                r.consent_changes
                    .iter()
                    .map(|c| {
                        vec![
                            c.purpose.clone(),
                            c.granted.to_string(),
                            c.withdrawn.to_string(),
                        ]
                    })
                    .collect(),
            ),
        ),
        (
            "Key rotations",
            table(
                &["seq", "time", "method", "identity"],
                r.key_rotations
                    .iter()
                    .map(|k| {
                        vec![
                            k.seq.to_string(),
                            k.time.clone(),
                            k.method.clone(),
                            k.identity.clone(),
                        ]
                    })
                    .collect(),
            ),
        ),
        (
            "Keys and their ages",
            table(
                &["key", "created", "age (days)"],
                r.keys
                    .iter()
                    .map(|k| vec![k.label.clone(), k.created.clone(), k.age_days.to_string()])
                    .collect(),
            ),
        ),
        (
            "Policies put in force",
            table(
                &["seq", "time", "policy hash (SHA-256)"],
                r.policy_loads
                    .iter()
                    .map(|p| vec![p.seq.to_string(), p.time.clone(), p.policy_hash.clone()])
                    .collect(),
            ),
        ),
    ]
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}
