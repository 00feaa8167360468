//! `kiln events`: kilnd's audit log (`/kiln/v1/events`): who changed what, with what
//! result, and what kilnd did on its own (idle suspends, auto-resumes, terminations).

use std::io::Write;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use reqwest::Method;
use serde_json::{json, Value};

use crate::client::Kilnd;
use crate::render::{timestamp, Table};
use crate::{Global, Output};

/// Most events kilnd returns per request.
const PAGE: usize = 1000;

/// `kiln events` flags.
#[derive(Args, Debug)]
#[command(
    after_help = "Times are UTC. Admin sees every event; anyone else sees their own calls \
                        and what kilnd did to their MicroVMs (principal `kilnd`).\n\n\
                        Examples:\n  \
                        kiln events\n  \
                        kiln events --since 1h\n  \
                        kiln events --since 10m --output json\n  \
                        kiln events --follow"
)]
pub struct EventsArgs {
    /// Only events since then: a time ago (30s, 10m, 1h, 2d) or epoch seconds.
    #[arg(long, value_name = "WHEN", value_parser = parse_since)]
    pub since: Option<f64>,
    /// Show at most this many events (the newest).
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u16).range(1..=1000))]
    pub limit: u16,
    /// Keep printing new events as they happen (checks every second) until Ctrl-C. With
    /// `--output json`, one event per line.
    #[arg(long, short)]
    pub follow: bool,
}

/// `--since`: `30s`, `10m`, `1h`, `2d` ago, or epoch seconds.
fn parse_since(text: &str) -> Result<f64, String> {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0);
    since_at(text, now)
}

fn since_at(text: &str, now: f64) -> Result<f64, String> {
    let bad = || {
        format!("'{text}' is not a time: give a time ago like 30s, 10m, 1h or 2d, or epoch seconds like {}", now.floor() - 3600.0)
    };
    let text = text.trim();
    let unit = match text.chars().last() {
        Some('s') => 1.0,
        Some('m') => 60.0,
        Some('h') => 3600.0,
        Some('d') => 86_400.0,
        _ => {
            return text
                .parse::<f64>()
                .ok()
                .filter(|t| t.is_finite())
                .ok_or_else(bad)
        }
    };
    let amount = text[..text.len() - 1]
        .parse::<f64>()
        .ok()
        .filter(|a| a.is_finite() && *a >= 0.0)
        .ok_or_else(bad)?;
    Ok(now - amount * unit)
}

/// One request for events: `since`, after event `after`, at most `limit`.
async fn page(
    kilnd: &Kilnd,
    since: Option<f64>,
    after: Option<i64>,
    limit: usize,
) -> anyhow::Result<Vec<Value>> {
    let mut query = vec![("limit".to_string(), limit.to_string())];
    if let Some(since) = since {
        query.push(("since".into(), format!("{since:.3}")));
    }
    if let Some(after) = after {
        query.push(("after".into(), after.to_string()));
    }
    let path = format!("/kiln/v1/events?{}", kiln_api::uri::format_query(&query));
    let answer = kilnd.kiln_json(Method::GET, &path, None).await?;
    answer["events"].as_array().cloned().with_context(|| {
        format!(
            "kilnd at {} answered /kiln/v1/events without an events list; is it older than this kiln?",
            kilnd.endpoint()
        )
    })
}

/// Every event since `since` after event `after`, page after page.
async fn all_after(
    kilnd: &Kilnd,
    since: Option<f64>,
    mut after: Option<i64>,
) -> anyhow::Result<Vec<Value>> {
    let mut events = Vec::new();
    loop {
        let more = page(kilnd, since, after, PAGE).await?;
        let full = more.len() == PAGE;
        after = more.last().and_then(id).or(after);
        events.extend(more);
        if !full {
            return Ok(events);
        }
    }
}

fn id(event: &Value) -> Option<i64> {
    event["id"].as_i64()
}

fn text(v: &Value) -> String {
    v.as_str().unwrap_or_default().to_string()
}

/// An event's cells: time, principal, operation, target, result, detail.
fn cells(e: &Value) -> [String; 6] {
    [
        e["time"].as_f64().map(timestamp).unwrap_or_default(),
        text(&e["principal"]),
        text(&e["operation"]),
        text(&e["target"]),
        text(&e["result"]),
        text(&e["reason"]),
    ]
}

const HEADERS: [&str; 6] = [
    "time",
    "principal",
    "operation",
    "target",
    "result",
    "detail",
];

/// A row for `--follow`, where later rows cannot widen the columns: fixed widths.
fn line(cells: &[String; 6]) -> String {
    format!(
        "{:<19}  {:<12}  {:<27}  {:<24}  {:<25}  {}",
        cells[0], cells[1], cells[2], cells[3], cells[4], cells[5]
    )
    .trim_end()
    .to_string()
}

/// Runs `kiln events`.
pub async fn run(g: &Global, kilnd: &Kilnd, a: EventsArgs) -> anyhow::Result<ExitCode> {
    let limit = usize::from(a.limit);
    let mut events = match a.since {
        // The newest `limit`, in one request.
        None => page(kilnd, None, None, limit).await?,
        Some(since) => all_after(kilnd, Some(since), None).await?,
    };
    if events.len() > limit {
        events.drain(..events.len() - limit);
    }
    if !a.follow {
        match g.output {
            Output::Json => println!("{}", crate::render::json(&json!({ "events": events }))),
            Output::Table if events.is_empty() => match a.since {
                Some(since) => eprintln!("no events since {} UTC", timestamp(since)),
                None => eprintln!(
                    "no events yet: kilnd records every call that changes something, and what it does on its own"
                ),
            },
            Output::Table => {
                let mut table = Table::new(&HEADERS);
                for e in &events {
                    table.row(cells(e).to_vec());
                }
                print!("{table}");
            }
        }
        return Ok(ExitCode::SUCCESS);
    }
    let mut out = std::io::stdout().lock();
    let print = |out: &mut std::io::StdoutLock<'_>, e: &Value| -> std::io::Result<()> {
        match g.output {
            Output::Json => writeln!(out, "{e}")?,
            Output::Table => writeln!(out, "{}", line(&cells(e)))?,
        }
        out.flush()
    };
    if g.output == Output::Table {
        writeln!(out, "{}", line(&HEADERS.map(str::to_uppercase)))?;
    }
    let mut last = None;
    for e in &events {
        print(&mut out, e)?;
        last = id(e).or(last);
    }
    // `after` 0 is "from the first event": nothing older than `since` was visible anyway.
    let mut after = last.unwrap_or(0);
    loop {
        tokio::time::sleep(Duration::from_secs(1)).await;
        for e in all_after(kilnd, a.since, Some(after)).await? {
            print(&mut out, &e)?;
            after = id(&e).unwrap_or(after);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn since_when_a_time_ago_or_epoch_then_epoch_seconds() {
        let now = 1_757_419_200.0;

        let got: Vec<Result<f64, String>> = ["10m", "1h", "30s", "2d", "1757000000"]
            .iter()
            .map(|t| since_at(t, now))
            .collect();

        assert_eq!(
            got,
            [
                Ok(now - 600.0),
                Ok(now - 3600.0),
                Ok(now - 30.0),
                Ok(now - 172_800.0),
                Ok(1_757_000_000.0)
            ]
        );
    }

    #[test]
    fn since_when_gibberish_then_says_what_it_takes() {
        let err = since_at("yesterday", 100.0).expect_err("not a time");

        assert!(err.contains("10m, 1h"), "{err}");
    }

    #[test]
    fn line_when_follow_then_fixed_columns() {
        let e = json!({
            "time": 1_757_419_200.0, "principal": "kilnd", "operation": "SuspendMicrovm",
            "target": "mvm-1", "result": "ok", "reason": "no endpoint traffic for 60 s"
        });

        let text = line(&cells(&e));

        assert!(text.starts_with("2025-09-09 12:00:00  kilnd "), "{text}");
        assert_eq!(text.find("SuspendMicrovm"), Some(19 + 2 + 12 + 2), "{text}");
        assert_eq!(text.find("mvm-1"), Some(19 + 2 + 12 + 2 + 27 + 2), "{text}");
        assert!(
            text.ends_with("  ok                         no endpoint traffic for 60 s"),
            "{text}"
        );
    }
}
