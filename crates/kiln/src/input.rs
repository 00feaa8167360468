//! Flag values that carry structures: JSON, AWS CLI shorthand (`key=value,key=value`), or
//! `file://path` holding either.
//!
//! Shorthand is flat: a value that starts with `{` or `[` is read as JSON (so
//! `range={"startPort":8000,"endPort":8100}` works), whole numbers become numbers and
//! `true`/`false` booleans in structures; map values stay strings. Anything deeper is JSON.

use anyhow::{bail, Context};
use serde_json::{Map, Value};

/// A fresh idempotency token: 32 random hex digits.
pub fn client_token() -> anyhow::Result<String> {
    let mut bytes = [0u8; 16];
    getrandom::fill(&mut bytes)
        .map_err(|e| anyhow::anyhow!("no randomness for a clientToken: {e}"))?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

/// The text of a value, read from the file a `file://` prefix names.
fn text(value: &str, flag: &str) -> anyhow::Result<String> {
    match value.strip_prefix("file://") {
        Some(path) => std::fs::read_to_string(path).with_context(|| {
            format!("{flag}: cannot read {path} (the value names a file with file://)")
        }),
        None => Ok(value.to_string()),
    }
}

fn looks_like_json(s: &str) -> bool {
    matches!(s.trim_start().chars().next(), Some('{' | '['))
}

fn json(s: &str, flag: &str, what: &str) -> anyhow::Result<Value> {
    serde_json::from_str(s).with_context(|| format!("{flag}: {what} is not valid JSON: {s}"))
}

/// A structure: a JSON object or shorthand.
pub fn structure(value: &str, flag: &str) -> anyhow::Result<Value> {
    let s = text(value, flag)?;
    if looks_like_json(&s) {
        let v = json(&s, flag, "the value")?;
        if !v.is_object() {
            bail!("{flag}: expected a JSON object ({{…}}), got {s}");
        }
        return Ok(v);
    }
    shorthand(&s, flag, true)
}

/// A string map: a JSON object of strings or shorthand.
pub fn string_map(value: &str, flag: &str) -> anyhow::Result<Value> {
    let s = text(value, flag)?;
    let v = if looks_like_json(&s) {
        json(&s, flag, "the value")?
    } else {
        shorthand(&s, flag, false)?
    };
    match &v {
        Value::Object(o) if o.values().all(Value::is_string) => Ok(v),
        _ => bail!("{flag}: expected KEY=VALUE,… or a JSON object of strings, got {s}"),
    }
}

/// A list of structures: each value a JSON object, a JSON array of objects, or shorthand.
pub fn structure_list(values: &[String], flag: &str) -> anyhow::Result<Value> {
    let mut out = Vec::new();
    for value in values {
        let s = text(value, flag)?;
        if s.trim_start().starts_with('[') {
            match json(&s, flag, "the list")? {
                Value::Array(items) => out.extend(items),
                _ => bail!("{flag}: expected a JSON list, got {s}"),
            }
        } else {
            out.push(structure(&s, flag)?);
        }
    }
    Ok(Value::Array(out))
}

/// A list of strings: the values, any JSON array among them spread out.
pub fn string_list(values: &[String], flag: &str) -> anyhow::Result<Vec<String>> {
    let mut out = Vec::new();
    for value in values {
        if value.trim_start().starts_with('[') {
            let items: Vec<String> = serde_json::from_str(value)
                .with_context(|| format!("{flag}: expected a JSON list of strings, got {value}"))?;
            out.extend(items);
        } else {
            out.push(value.clone());
        }
    }
    Ok(out)
}

/// `key=value,key=value` as a JSON object; with `typed`, numbers and booleans are
/// converted (structures), else every value stays a string (maps).
fn shorthand(s: &str, flag: &str, typed: bool) -> anyhow::Result<Value> {
    let mut obj = Map::new();
    for part in split_top_level(s) {
        let part = part.trim();
        if part.is_empty() {
            continue;
        }
        let Some((key, value)) = part.split_once('=') else {
            bail!("{flag}: `{part}` is not key=value; write key=value,key2=value2 or JSON");
        };
        let (key, value) = (key.trim(), value.trim());
        if key.is_empty() {
            bail!("{flag}: `{part}` has no key before `=`");
        }
        let v = if typed && looks_like_json(value) {
            json(value, flag, &format!("the value of {key}"))?
        } else if typed {
            scalar(value)
        } else {
            Value::String(value.to_string())
        };
        obj.insert(key.to_string(), v);
    }
    if obj.is_empty() {
        bail!("{flag}: empty value; write key=value,key2=value2 or JSON");
    }
    Ok(Value::Object(obj))
}

fn scalar(v: &str) -> Value {
    match v {
        "true" => Value::Bool(true),
        "false" => Value::Bool(false),
        _ => v
            .parse::<i64>()
            .map(Value::from)
            .unwrap_or_else(|_| Value::String(unquote(v).to_string())),
    }
}

fn unquote(v: &str) -> &str {
    v.strip_prefix('"')
        .and_then(|v| v.strip_suffix('"'))
        .unwrap_or(v)
}

/// Splits on commas that are outside quotes, `{…}` and `[…]`.
fn split_top_level(s: &str) -> Vec<&str> {
    let (mut parts, mut depth, mut quoted, mut start) = (Vec::new(), 0i32, false, 0);
    let mut escaped = false;
    for (i, c) in s.char_indices() {
        match c {
            _ if escaped => escaped = false,
            '\\' if quoted => escaped = true,
            '"' => quoted = !quoted,
            '{' | '[' if !quoted => depth += 1,
            '}' | ']' if !quoted => depth -= 1,
            ',' if !quoted && depth == 0 => {
                parts.push(&s[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    parts.push(&s[start..]);
    parts
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn structure_when_shorthand_then_numbers_and_booleans_typed() {
        let v = structure(
            "maxIdleDurationSeconds=600,autoResumeEnabled=true,name=web",
            "--x",
        )
        .expect("parses");

        assert_eq!(
            v,
            json!({"maxIdleDurationSeconds": 600, "autoResumeEnabled": true, "name": "web"})
        );
    }

    #[test]
    fn structure_when_nested_json_value_then_commas_inside_kept() {
        let v = structure(r#"range={"startPort":1,"endPort":2}"#, "--x").expect("parses");

        assert_eq!(v, json!({"range": {"startPort": 1, "endPort": 2}}));
    }

    #[test]
    fn map_when_shorthand_then_values_stay_strings() {
        let v = string_map("PORT=8080,URL=http://a/b?c=d", "--env").expect("parses");

        assert_eq!(v, json!({"PORT": "8080", "URL": "http://a/b?c=d"}));
    }

    #[test]
    fn structure_list_when_json_array_and_shorthand_then_merged() {
        let v = structure_list(&["port=80".into(), r#"[{"allPorts":{}}]"#.into()], "--p")
            .expect("parses");

        assert_eq!(v, json!([{"port": 80}, {"allPorts": {}}]));
    }

    #[test]
    fn structure_when_file_prefix_then_file_read() {
        let dir = tempfile::tempdir().expect("dir");
        let f = dir.path().join("p.json");
        std::fs::write(&f, r#"{"uri":"file:///a.zip"}"#).expect("write");

        let v = structure(&format!("file://{}", f.display()), "--code-artifact").expect("parses");

        assert_eq!(v, json!({"uri": "file:///a.zip"}));
    }

    #[test]
    fn structure_when_missing_equals_then_says_how_to_write_it() {
        let err = structure("port", "--allowed-ports")
            .expect_err("bad")
            .to_string();

        assert!(
            err.contains("--allowed-ports") && err.contains("key=value"),
            "{err}"
        );
    }

    #[test]
    fn client_token_when_made_twice_then_differs() {
        assert_ne!(client_token().expect("a"), client_token().expect("b"));
    }
}
