//! What kiln prints: aligned tables and key-value views for people, JSON for scripts.

use std::fmt::Write as _;
use std::time::SystemTime;

use serde_json::Value;

use crate::Output;

/// Columns of a table, and its rows.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Table {
    headers: Vec<String>,
    rows: Vec<Vec<String>>,
}

impl Table {
    /// A table with these column headers.
    pub fn new<S: AsRef<str>>(headers: &[S]) -> Self {
        Table {
            headers: headers.iter().map(|h| h.as_ref().to_uppercase()).collect(),
            rows: Vec::new(),
        }
    }

    /// Adds a row (missing cells are empty).
    pub fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }
}

impl std::fmt::Display for Table {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut widths: Vec<usize> = self.headers.iter().map(|h| h.chars().count()).collect();
        for row in &self.rows {
            for (i, cell) in row.iter().enumerate().take(widths.len()) {
                widths[i] = widths[i].max(cell.chars().count());
            }
        }
        let line = |cells: &[String]| {
            let mut out = String::new();
            for (i, width) in widths.iter().enumerate() {
                let cell = cells.get(i).map(String::as_str).unwrap_or("");
                if i + 1 == widths.len() {
                    out.push_str(cell);
                } else {
                    let _ = write!(out, "{cell:<width$}  ");
                }
            }
            out.trim_end().to_string()
        };
        writeln!(f, "{}", line(&self.headers))?;
        for row in &self.rows {
            writeln!(f, "{}", line(row))?;
        }
        Ok(())
    }
}

/// `key  value` lines, keys aligned.
pub fn key_values(pairs: &[(String, String)]) -> String {
    let width = pairs
        .iter()
        .map(|(k, _)| k.chars().count())
        .max()
        .unwrap_or(0);
    let mut out = String::new();
    for (k, v) in pairs {
        let _ = writeln!(out, "{k:<width$}  {v}");
    }
    out
}

/// Seconds since the epoch as `YYYY-MM-DD HH:MM:SS` (UTC).
pub fn timestamp(secs: f64) -> String {
    let total = secs.floor() as i64;
    let (days, rem) = (total.div_euclid(86_400), total.rem_euclid(86_400));
    let (y, m, d) = civil_from_days(days);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02}",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// Year, month, day of the day `days` after 1970-01-01 (proleptic Gregorian).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

/// How long ago `secs` (epoch seconds) was: `42s`, `5m`, `3h`, `2d`.
pub fn age(secs: f64) -> String {
    let now = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(secs);
    duration((now - secs).max(0.0) as u64)
}

/// A duration in its largest whole unit: `42s`, `5m`, `3h`, `2d`.
pub fn duration(s: u64) -> String {
    match s {
        0..=119 => format!("{s}s"),
        120..=7199 => format!("{}m", s / 60),
        7200..=172_799 => format!("{}h", s / 3600),
        _ => format!("{}d", s / 86_400),
    }
}

/// A byte count as people read it: `512 B`, `1.5 KiB`, `100.0 GiB`.
pub fn bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = n as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

/// The last part of an image ARN (`…:microvm-image:web` → `web`).
pub fn image_name(arn: &str) -> &str {
    arn.rsplit(':').next().unwrap_or(arn)
}

/// A scalar as a cell; timestamps (`…At` members) as dates.
fn cell(key: &str, v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Number(n) if key.ends_with("At") => n.as_f64().map(timestamp).unwrap_or_default(),
        Value::Null => String::new(),
        other => other.to_string(),
    }
}

/// Flattens nested objects into `a.b` keys; lists of scalars joined, other lists as JSON.
fn flatten(prefix: &str, v: &Value, out: &mut Vec<(String, String)>) {
    match v {
        Value::Object(o) if !o.is_empty() => {
            for (k, v) in o {
                let key = if prefix.is_empty() {
                    k.clone()
                } else {
                    format!("{prefix}.{k}")
                };
                flatten(&key, v, out);
            }
        }
        Value::Array(items) if items.iter().all(|i| !i.is_object() && !i.is_array()) => {
            let joined: Vec<String> = items.iter().map(|i| cell(prefix, i)).collect();
            out.push((prefix.to_string(), joined.join(", ")));
        }
        Value::Array(_) | Value::Object(_) => out.push((prefix.to_string(), v.to_string())),
        scalar => out.push((prefix.to_string(), cell(prefix, scalar))),
    }
}

/// The item members shown as columns when present, in this order.
const COLUMNS: &[&str] = &[
    "microvmId",
    "name",
    "imageArn",
    "imageVersion",
    "buildId",
    "state",
    "status",
    "buildState",
    "architecture",
    "chipset",
    "latestActiveImageVersion",
    "createdAt",
    "startedAt",
    "updatedAt",
];

/// An API output for people: a table of `items` (plus the next page's token), or the
/// members as key-value lines.
pub fn human(v: &Value) -> String {
    match v {
        Value::Null => String::new(),
        Value::Object(o) => {
            if let Some(Value::Array(items)) = o.get("items") {
                let mut text = items_table(items);
                if let Some(Value::String(t)) = o.get("nextToken") {
                    let _ = writeln!(text, "more: --next-token {t}");
                }
                return text;
            }
            let mut pairs = Vec::new();
            flatten("", v, &mut pairs);
            key_values(&pairs)
        }
        other => format!("{other}\n"),
    }
}

fn items_table(items: &[Value]) -> String {
    if items.is_empty() {
        return "(none)\n".into();
    }
    let present = |k: &str| items.iter().any(|i| i.get(k).is_some());
    let mut columns: Vec<String> = COLUMNS
        .iter()
        .filter(|k| present(k))
        .map(|k| k.to_string())
        .collect();
    if columns.is_empty() {
        for item in items {
            for (k, v) in item.as_object().into_iter().flatten() {
                if !v.is_object() && !v.is_array() && !columns.contains(k) {
                    columns.push(k.clone());
                }
            }
        }
    }
    let mut table = Table::new(&columns);
    for item in items {
        table.row(columns.iter().map(|c| cell(c, &item[c.as_str()])).collect());
    }
    table.to_string()
}

/// Prints an API output as `output` asks.
pub fn print(v: &Value, output: Output) {
    match output {
        Output::Json => println!("{}", json(v)),
        Output::Table => print!("{}", human(v)),
    }
}

/// Pretty JSON; an empty output is `{}`.
pub fn json(v: &Value) -> String {
    let v = if v.is_null() {
        &Value::Object(Default::default())
    } else {
        v
    };
    serde_json::to_string_pretty(v).unwrap_or_else(|_| v.to_string())
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn bytes_when_sizes_then_readable_units() {
        assert_eq!(bytes(512), "512 B");
        assert_eq!(bytes(1536), "1.5 KiB");
        assert_eq!(bytes(100 << 30), "100.0 GiB");
    }

    #[test]
    fn table_when_cells_differ_in_width_then_columns_aligned() {
        let mut t = Table::new(&["id", "state"]);
        t.row(vec!["mvm-1".into(), "RUNNING".into()]);
        t.row(vec!["mvm-12345".into(), "SUSPENDED".into()]);

        assert_eq!(
            t.to_string(),
            "ID         STATE\nmvm-1      RUNNING\nmvm-12345  SUSPENDED\n"
        );
    }

    #[test]
    fn timestamp_when_epoch_seconds_then_utc_date() {
        assert_eq!(timestamp(1_757_419_200.5), "2025-09-09 12:00:00");
        assert_eq!(timestamp(951_782_400.0), "2000-02-29 00:00:00");
    }

    #[test]
    fn human_when_items_then_table_of_known_columns() {
        let out = human(&json!({"items": [
            {"microvmId": "mvm-1", "state": "RUNNING", "imageArn": "arn:x", "imageVersion": "1", "startedAt": 1_757_419_200}
        ]}));

        assert_eq!(
            out,
            "MICROVMID  IMAGEARN  IMAGEVERSION  STATE    STARTEDAT\nmvm-1      arn:x     1             RUNNING  2025-09-09 12:00:00\n"
        );
    }

    #[test]
    fn human_when_nested_object_then_dotted_keys() {
        let out = human(&json!({"authToken": {"X-aws-proxy-auth": "tok"}, "state": "RUNNING"}));

        assert_eq!(
            out,
            "authToken.X-aws-proxy-auth  tok\nstate                       RUNNING\n"
        );
    }

    #[test]
    fn duration_when_growing_then_larger_units() {
        let got: Vec<String> = [5, 150, 7200, 200_000]
            .iter()
            .map(|s| duration(*s))
            .collect();

        assert_eq!(got, ["5s", "2m", "2h", "2d"]);
    }
}
