//! The Dockerfile's lines: parser directives, comments, continuations, words and flags.

use super::{Heredoc, ParseError};

/// Directives kiln knows (`check` is BuildKit's lint directive; it is accepted and ignored).
const DIRECTIVES: [&str; 3] = ["escape", "syntax", "check"];

/// The text split into logical lines.
pub(crate) struct Source {
    /// The escape character.
    pub escape: char,
    /// Logical lines (instructions), in order.
    pub lines: Vec<Logical>,
}

/// One instruction's logical line.
pub(crate) struct Logical {
    /// The 1-based line it starts on.
    pub line: usize,
    /// The instruction's name as written.
    pub keyword: String,
    /// Everything after the name, trimmed.
    pub rest: String,
    /// The whole logical line, trimmed.
    pub text: String,
    /// The here-documents that follow the line (RUN, COPY and ADD only), in order.
    pub heredocs: Vec<Heredoc>,
}

/// Instructions whose lines may open here-documents (as BuildKit allows).
const HEREDOC_INSTRUCTIONS: [&str; 3] = ["RUN", "COPY", "ADD"];

/// Reads directives, drops comments and blank lines, joins continuations.
pub(crate) fn split(text: &str) -> Result<Source, ParseError> {
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let lines: Vec<&str> = text.lines().collect();
    let escape = directives(&lines)?;
    let mut logical_lines = Vec::new();
    let mut i = 0;
    while i < lines.len() {
        let start = i + 1;
        let first = lines[i].trim_start();
        i += 1;
        if first.is_empty() || first.starts_with('#') {
            continue;
        }
        let (mut logical, mut continued) = trim_continuation(first, escape);
        while continued && i < lines.len() {
            let next = lines[i];
            i += 1;
            // Docker drops comment lines and empty lines inside a continuation.
            if next.trim_start().starts_with('#') || next.trim().is_empty() {
                continue;
            }
            let (part, more) = trim_continuation(next, escape);
            logical.push_str(&part);
            continued = more;
        }
        let logical = logical.trim();
        let (keyword, rest) = logical
            .split_once(char::is_whitespace)
            .unwrap_or((logical, ""));
        let mut heredocs = Vec::new();
        if HEREDOC_INSTRUCTIONS.contains(&keyword.to_ascii_uppercase().as_str()) {
            for marker in heredoc_markers(rest, escape) {
                let (content, next) = heredoc_body(&lines, i, &marker).ok_or_else(|| {
                    ParseError::new(
                        start,
                        format!(
                            "the here-document <<{} is not terminated: end it with a line \
                             holding only {}",
                            marker.name, marker.name
                        ),
                    )
                })?;
                i = next;
                heredocs.push(Heredoc {
                    name: marker.name,
                    content,
                    expand: marker.expand,
                    strip_tabs: marker.strip_tabs,
                });
            }
        }
        logical_lines.push(Logical {
            line: start,
            keyword: keyword.to_string(),
            rest: rest.trim().to_string(),
            text: logical.to_string(),
            heredocs,
        });
    }
    Ok(Source {
        escape,
        lines: logical_lines,
    })
}

/// The escape character chosen by the directives at the top (`\` by default).
fn directives(lines: &[&str]) -> Result<char, ParseError> {
    let mut escape = None;
    let mut seen: Vec<String> = Vec::new();
    for (index, line) in lines.iter().enumerate() {
        let Some((name, value)) = directive(line) else {
            break;
        };
        if !DIRECTIVES.contains(&name.as_str()) {
            // Docker treats unknown directives as comments, which end the directives.
            break;
        }
        if seen.contains(&name) {
            return Err(ParseError::new(
                index + 1,
                format!("parser directive `{name}` is given twice: keep one"),
            ));
        }
        if name == "escape" {
            escape = Some(match value.as_str() {
                "\\" => '\\',
                "`" => '`',
                other => {
                    return Err(ParseError::new(
                        index + 1,
                        format!("invalid escape character {other:?}: use \\ or `"),
                    ))
                }
            });
        }
        seen.push(name);
    }
    Ok(escape.unwrap_or('\\'))
}

/// `# name = value` as a directive (name lowercased), if the line has that shape.
fn directive(line: &str) -> Option<(String, String)> {
    let body = line.trim_start().strip_prefix('#')?.trim_start();
    let name_len = body
        .find(|c: char| !c.is_ascii_alphanumeric())
        .unwrap_or(body.len());
    let name = &body[..name_len];
    if !name.starts_with(|c: char| c.is_ascii_alphabetic()) {
        return None;
    }
    let value = body[name_len..].trim_start().strip_prefix('=')?.trim();
    Some((name.to_ascii_lowercase(), value.to_string()))
}

/// The line without a trailing escape character (and the blanks after it), and whether
/// the instruction continues on the next line.
fn trim_continuation(line: &str, escape: char) -> (String, bool) {
    let trimmed = line.trim_end_matches([' ', '\t', '\r']);
    match trimmed.strip_suffix(escape) {
        Some(body) => (body.to_string(), true),
        None => (line.trim_end_matches('\r').to_string(), false),
    }
}

/// A `<<[-]WORD` word on an instruction's line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct HeredocMarker {
    /// The delimiter, quotes removed.
    pub name: String,
    /// `<<-`: leading tabs are stripped from the body and the delimiter line.
    pub strip_tabs: bool,
    /// The delimiter was unquoted, so the body's variables are expanded.
    pub expand: bool,
}

/// The here-document markers among `text`'s words, in order (BuildKit matches each word
/// against `<<[-]delimiter`, the delimiter holding no `<`).
pub(crate) fn heredoc_markers(text: &str, escape: char) -> Vec<HeredocMarker> {
    words(text, escape)
        .iter()
        .filter_map(|word| heredoc_marker(word, escape))
        .collect()
}

/// The marker a word is, if it is one.
pub(crate) fn heredoc_marker(word: &str, escape: char) -> Option<HeredocMarker> {
    let after = word.strip_prefix("<<")?;
    let (strip_tabs, raw) = match after.strip_prefix('-') {
        Some(raw) => (true, raw),
        None => (false, after),
    };
    if raw.is_empty() || raw.contains('<') {
        return None;
    }
    let mut name = String::new();
    let mut chars = raw.chars();
    while let Some(c) = chars.next() {
        match c {
            '\'' | '"' => {}
            c if c == escape => name.extend(chars.next()),
            c => name.push(c),
        }
    }
    if name.is_empty() {
        return None;
    }
    let expand = name == raw;
    Some(HeredocMarker {
        name,
        strip_tabs,
        expand,
    })
}

/// The body of one here-document starting at `lines[from]`: its content (each line ending
/// in `\n`, leading tabs gone for `<<-`) and the index of the line after the delimiter.
/// `None` when the text ends before the delimiter.
fn heredoc_body(lines: &[&str], from: usize, marker: &HeredocMarker) -> Option<(String, usize)> {
    let mut content = String::new();
    for (index, raw) in lines.iter().enumerate().skip(from) {
        let line = raw.strip_suffix('\r').unwrap_or(raw);
        let line = if marker.strip_tabs {
            line.trim_start_matches('\t')
        } else {
            line
        };
        if line == marker.name {
            return Some((content, index + 1));
        }
        content.push_str(line);
        content.push('\n');
    }
    None
}

/// Splits on blanks outside quotes, keeping quotes and escapes in the words (Docker's
/// `parseWords`; [`super::expand`] removes them later).
pub(crate) fn words(text: &str, escape: char) -> Vec<String> {
    let mut words = Vec::new();
    let mut word = String::new();
    let mut quote: Option<char> = None;
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c == escape {
            word.push(c);
            if let Some(next) = chars.next() {
                word.push(next);
            }
            continue;
        }
        match quote {
            Some(q) => {
                if c == q {
                    quote = None;
                }
                word.push(c);
            }
            None if c.is_whitespace() => {
                if !word.is_empty() {
                    words.push(std::mem::take(&mut word));
                }
            }
            None => {
                if c == '\'' || c == '"' {
                    quote = Some(c);
                }
                word.push(c);
            }
        }
    }
    if !word.is_empty() {
        words.push(word);
    }
    words
}

/// The strings of a JSON array of strings, if `text` is one (exec form).
pub(crate) fn json_array(text: &str) -> Option<Vec<String>> {
    if !text.starts_with('[') {
        return None;
    }
    serde_json::from_str(text).ok()
}

/// Leading `--name[=value]` flags, and the text after them.
pub(crate) fn flags(text: &str) -> (Vec<(String, Option<String>)>, &str) {
    let mut found = Vec::new();
    let mut rest = text.trim_start();
    while let Some(after) = rest.strip_prefix("--") {
        let end = after.find(char::is_whitespace).unwrap_or(after.len());
        let flag = &after[..end];
        match flag.split_once('=') {
            Some((name, value)) => found.push((name.to_ascii_lowercase(), Some(value.into()))),
            None => found.push((flag.to_ascii_lowercase(), None)),
        }
        rest = after[end..].trim_start();
    }
    (found, rest)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn words_when_quotes_and_escapes_then_kept_inside_one_word() {
        let split = words(r#"a=1 b="x y" c='p q' d=e\ f"#, '\\');

        assert_eq!(split, ["a=1", r#"b="x y""#, "c='p q'", r"d=e\ f"]);
    }

    #[test]
    fn flags_when_leading_then_split_from_rest() {
        let (found, rest) = flags("--chown=app:app --link src dst");

        assert_eq!(
            found,
            [
                ("chown".to_string(), Some("app:app".to_string())),
                ("link".to_string(), None)
            ]
        );
        assert_eq!(rest, "src dst");
    }

    #[test]
    fn json_array_when_invalid_then_none() {
        assert_eq!(
            json_array(r#"["a", "b"]"#),
            Some(vec!["a".into(), "b".into()])
        );
        assert_eq!(json_array("[a, b]"), None);
        assert_eq!(json_array(r#"["a", 1]"#), None);
    }
}
