//! Variable expansion in Dockerfile words, as Docker's shell-word processing does it.

use super::ParseError;

/// Expands `$VAR`, `${VAR}`, `${VAR:-default}`, `${VAR-default}`, `${VAR:+alt}`,
/// `${VAR+alt}`, `${VAR:?message}` and `${VAR?message}` in `s`, looking names up in `vars`
/// (unset names expand to nothing). Like Docker it also removes quotes: nothing inside
/// `'…'` is expanded; inside `"…"` only variables are; `escape` followed by a character
/// gives that character literally (`\$HOME` is `$HOME`). Errors carry line 0: set the line.
pub fn expand(
    s: &str,
    vars: &dyn Fn(&str) -> Option<String>,
    escape: char,
) -> Result<String, ParseError> {
    expand_with(s, vars, escape, false)
}

/// Expands variables as [`expand`] does but keeps quotes as they are (BuildKit's rule for
/// the content of an unquoted COPY here-document); `escape` before `$` or itself still
/// gives that character literally.
pub fn expand_vars(
    s: &str,
    vars: &dyn Fn(&str) -> Option<String>,
    escape: char,
) -> Result<String, ParseError> {
    expand_with(s, vars, escape, true)
}

fn expand_with(
    s: &str,
    vars: &dyn Fn(&str) -> Option<String>,
    escape: char,
    keep_quotes: bool,
) -> Result<String, ParseError> {
    Words {
        chars: s.chars().collect(),
        at: 0,
        escape,
        vars,
        source: s,
        keep_quotes,
    }
    .process(None)
}

struct Words<'a> {
    chars: Vec<char>,
    at: usize,
    escape: char,
    vars: &'a dyn Fn(&str) -> Option<String>,
    source: &'a str,
    /// Quotes are ordinary characters (here-document content).
    keep_quotes: bool,
}

impl Words<'_> {
    fn peek(&self) -> Option<char> {
        self.chars.get(self.at).copied()
    }

    fn next(&mut self) -> Option<char> {
        let c = self.peek();
        self.at += 1;
        c
    }

    fn error(&self, what: &str) -> ParseError {
        ParseError::new(0, format!("cannot expand {:?}: {what}", self.source))
    }

    /// Processes up to `stop` (consumed) or the end.
    fn process(&mut self, stop: Option<char>) -> Result<String, ParseError> {
        let mut out = String::new();
        loop {
            let Some(c) = self.peek() else {
                return match stop {
                    Some(_) => Err(self.error("a `${` has no closing `}`")),
                    None => Ok(out),
                };
            };
            if Some(c) == stop {
                self.at += 1;
                return Ok(out);
            }
            if self.keep_quotes {
                self.at += 1;
                match c {
                    '$' => {
                        self.at -= 1;
                        out.push_str(&self.dollar()?);
                    }
                    c if c == self.escape => match self.peek() {
                        Some(next) if next == '$' || next == self.escape => {
                            self.at += 1;
                            out.push(next);
                        }
                        _ => out.push(c),
                    },
                    c => out.push(c),
                }
                continue;
            }
            match c {
                '\'' => {
                    self.at += 1;
                    out.push_str(&self.single_quoted()?);
                }
                '"' => {
                    self.at += 1;
                    out.push_str(&self.double_quoted()?);
                }
                '$' => out.push_str(&self.dollar()?),
                c if c == self.escape => {
                    self.at += 1;
                    if let Some(next) = self.next() {
                        out.push(next);
                    }
                }
                c => {
                    self.at += 1;
                    out.push(c);
                }
            }
        }
    }

    fn single_quoted(&mut self) -> Result<String, ParseError> {
        let mut out = String::new();
        loop {
            match self.next() {
                Some('\'') => return Ok(out),
                Some(c) => out.push(c),
                None => return Err(self.error("a single quote is not closed")),
            }
        }
    }

    fn double_quoted(&mut self) -> Result<String, ParseError> {
        let mut out = String::new();
        loop {
            match self.peek() {
                None => return Err(self.error("a double quote is not closed")),
                Some('"') => {
                    self.at += 1;
                    return Ok(out);
                }
                Some('$') => out.push_str(&self.dollar()?),
                Some(c) if c == self.escape => {
                    self.at += 1;
                    match self.peek() {
                        Some(next) if next == '"' || next == '$' || next == self.escape => {
                            self.at += 1;
                            out.push(next);
                        }
                        _ => out.push(c),
                    }
                }
                Some(c) => {
                    self.at += 1;
                    out.push(c);
                }
            }
        }
    }

    /// Expands the `$…` at the cursor.
    fn dollar(&mut self) -> Result<String, ParseError> {
        self.at += 1;
        match self.peek() {
            Some('{') => {
                self.at += 1;
                self.braced()
            }
            Some(c) if c.is_ascii_alphabetic() || c == '_' => {
                let name = self.name();
                Ok((self.vars)(&name).unwrap_or_default())
            }
            _ => Ok("$".into()),
        }
    }

    fn name(&mut self) -> String {
        let mut name = String::new();
        while let Some(c) = self
            .peek()
            .filter(|c| c.is_ascii_alphanumeric() || *c == '_')
        {
            name.push(c);
            self.at += 1;
        }
        name
    }

    /// `${…}` after the `{`.
    fn braced(&mut self) -> Result<String, ParseError> {
        let name = self.name();
        if name.is_empty() || name.starts_with(|c: char| c.is_ascii_digit()) {
            return Err(self.error("bad substitution: `${` must be followed by a name"));
        }
        let value = (self.vars)(&name);
        let colon = self.peek() == Some(':');
        if colon {
            self.at += 1;
        }
        let op = self.next();
        if op == Some('}') && !colon {
            return Ok(value.unwrap_or_default());
        }
        let usable = match &value {
            Some(v) => !colon || !v.is_empty(),
            None => false,
        };
        match op {
            Some('-') => {
                let word = self.process(Some('}'))?;
                Ok(if usable {
                    value.unwrap_or_default()
                } else {
                    word
                })
            }
            Some('+') => {
                let word = self.process(Some('}'))?;
                Ok(if usable { word } else { String::new() })
            }
            Some('?') => {
                let word = self.process(Some('}'))?;
                match value.filter(|_| usable) {
                    Some(v) => Ok(v),
                    None if word.is_empty() => Err(self.error(&format!("{name} is not set"))),
                    None => Err(self.error(&format!("{name}: {word}"))),
                }
            }
            _ => Err(self.error(&format!(
                "bad substitution in `${{{name}…}}`: kiln supports ${{VAR}}, ${{VAR:-default}}, \
                 ${{VAR:+alt}} and ${{VAR:?message}}"
            ))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars(name: &str) -> Option<String> {
        match name {
            "HOME" => Some("/root".into()),
            "EMPTY" => Some(String::new()),
            "V" => Some("1.2".into()),
            _ => None,
        }
    }

    fn run(s: &str) -> Result<String, ParseError> {
        expand(s, &vars, '\\')
    }

    #[test]
    fn expand_when_plain_and_braced_then_substituted() {
        assert_eq!(run("$HOME/app").as_deref(), Ok("/root/app"));
        assert_eq!(run("${HOME}app-${V}").as_deref(), Ok("/rootapp-1.2"));
        assert_eq!(run("x$UNSET.y").as_deref(), Ok("x.y"));
    }

    #[test]
    fn expand_when_default_then_used_for_unset_or_empty() {
        assert_eq!(run("${UNSET:-/srv}").as_deref(), Ok("/srv"));
        assert_eq!(run("${EMPTY:-/srv}").as_deref(), Ok("/srv"));
        assert_eq!(run("${EMPTY-/srv}").as_deref(), Ok(""));
        assert_eq!(run("${HOME:-/srv}").as_deref(), Ok("/root"));
        assert_eq!(run("${UNSET:-$HOME/x}").as_deref(), Ok("/root/x"));
    }

    #[test]
    fn expand_when_alternative_then_used_only_when_set() {
        assert_eq!(run("${V:+v$V}").as_deref(), Ok("v1.2"));
        assert_eq!(run("${EMPTY:+alt}").as_deref(), Ok(""));
        assert_eq!(run("${UNSET:+alt}").as_deref(), Ok(""));
    }

    #[test]
    fn expand_when_escaped_dollar_then_literal() {
        assert_eq!(run(r"\$HOME").as_deref(), Ok("$HOME"));
        assert_eq!(expand("`$HOME", &vars, '`').as_deref(), Ok("$HOME"));
        assert_eq!(expand(r"C:\dir", &vars, '`').as_deref(), Ok(r"C:\dir"));
    }

    #[test]
    fn expand_when_quotes_then_removed_and_single_quotes_literal() {
        assert_eq!(run(r#""v 2 $V""#).as_deref(), Ok("v 2 1.2"));
        assert_eq!(run("'$HOME'").as_deref(), Ok("$HOME"));
        assert_eq!(run(r#""a \"b\" \$x""#).as_deref(), Ok(r#"a "b" $x"#));
    }

    #[test]
    fn expand_when_lone_dollar_then_kept() {
        assert_eq!(run("cost $5 $").as_deref(), Ok("cost $5 $"));
    }

    #[test]
    fn expand_when_required_and_unset_then_error() {
        let err = run("${UNSET:?give UNSET}").expect_err("required");

        assert!(err.message.contains("UNSET: give UNSET"), "{err}");
    }

    #[test]
    fn expand_when_unclosed_brace_or_quote_then_error() {
        assert!(run("${HOME").is_err());
        assert!(run("${}").is_err());
        assert!(run("'open").is_err());
        assert!(run("${HOME/x/y}").is_err());
    }
}
