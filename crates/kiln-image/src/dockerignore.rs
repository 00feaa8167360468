//! `.dockerignore`: which paths of a build context are left out, with Docker's semantics.
//!
//! One pattern per line; `#` starts a comment line; patterns are relative to the context
//! root, cleaned like Go's `filepath.Clean` (leading and trailing `/` dropped). `*`, `?` and
//! `[...]` behave as in Go's `filepath.Match`; `**` matches any number of directories. A
//! pattern that matches a directory also matches everything below it; `!` re-includes, and
//! the last pattern that matches a path decides.

/// A parse failure, with the 1-based line of `.dockerignore` it is on.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(".dockerignore line {line}: {message} (fix or remove the pattern)")]
pub struct IgnoreError {
    /// The 1-based line.
    pub line: usize,
    /// What is wrong.
    pub message: String,
}

/// The parsed rules of a `.dockerignore` file.
#[derive(Debug, Clone, Default)]
pub struct DockerIgnore {
    rules: Vec<Rule>,
}

#[derive(Debug, Clone)]
struct Rule {
    /// `!pattern`: a match re-includes the path.
    exception: bool,
    tokens: Vec<Token>,
}

#[derive(Debug, Clone, PartialEq)]
enum Token {
    Literal(char),
    /// `*`: any run of characters other than `/`.
    Star,
    /// `?`: one character other than `/`.
    Question,
    /// `**` at the end of the pattern: anything, `/` included.
    Everything,
    /// `**` (or `**/`) elsewhere: zero or more whole directories.
    Directories,
    /// `[...]`: one character (never `/`) in, or with `^` not in, the ranges.
    Class {
        negated: bool,
        ranges: Vec<(char, char)>,
    },
}

impl DockerIgnore {
    /// Parses the text of a `.dockerignore` file.
    pub fn parse(text: &str) -> Result<Self, IgnoreError> {
        let text = text.strip_prefix('\u{feff}').unwrap_or(text);
        let mut rules = Vec::new();
        for (index, raw) in text.lines().enumerate() {
            if raw.starts_with('#') {
                continue;
            }
            let mut pattern = raw.trim();
            if pattern.is_empty() {
                continue;
            }
            let exception = pattern.starts_with('!');
            if exception {
                pattern = pattern[1..].trim();
            }
            if pattern.is_empty() {
                return Err(IgnoreError {
                    line: index + 1,
                    message: "`!` must be followed by a pattern".into(),
                });
            }
            let cleaned = clean(pattern);
            let tokens = compile(&cleaned).map_err(|message| IgnoreError {
                line: index + 1,
                message,
            })?;
            rules.push(Rule { exception, tokens });
        }
        Ok(Self { rules })
    }

    /// Whether `rel_path` (relative to the context root, `/`-separated) is left out of the
    /// context. `is_dir` says whether it is a directory; Docker's rules match files and
    /// directories alike, so today it does not change the answer.
    pub fn is_ignored(&self, rel_path: &str, is_dir: bool) -> bool {
        let _ = is_dir;
        let path = clean(rel_path);
        let mut ignored = false;
        for rule in &self.rules {
            if rule.matches_or_parent_matches(&path) {
                ignored = !rule.exception;
            }
        }
        ignored
    }

    /// Whether some `!` rule exists, so an ignored directory may still hold included paths.
    pub fn has_exceptions(&self) -> bool {
        self.rules.iter().any(|r| r.exception)
    }

    /// Whether there are no rules at all.
    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }
}

impl Rule {
    fn matches_or_parent_matches(&self, path: &str) -> bool {
        let chars: Vec<char> = path.chars().collect();
        if matches(&self.tokens, &chars) {
            return true;
        }
        chars
            .iter()
            .enumerate()
            .filter(|(_, c)| **c == '/')
            .any(|(i, _)| matches(&self.tokens, &chars[..i]))
    }
}

/// Go's `filepath.Clean` for `/`-separated paths, then without a leading `/`.
fn clean(path: &str) -> String {
    let rooted = path.starts_with('/');
    let mut parts: Vec<&str> = Vec::new();
    for part in path.split('/') {
        match part {
            "" | "." => {}
            ".." => match parts.last() {
                Some(&last) if last != ".." => {
                    parts.pop();
                }
                _ if rooted => {}
                _ => parts.push(".."),
            },
            other => parts.push(other),
        }
    }
    if parts.is_empty() {
        return ".".into();
    }
    parts.join("/")
}

/// Turns a cleaned pattern into tokens, as Docker's pattern matcher builds its regex.
fn compile(pattern: &str) -> Result<Vec<Token>, String> {
    let chars: Vec<char> = pattern.chars().collect();
    let mut tokens = Vec::new();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        i += 1;
        match c {
            '*' if chars.get(i) == Some(&'*') => {
                i += 1;
                if chars.get(i) == Some(&'/') {
                    i += 1;
                }
                tokens.push(if i == chars.len() {
                    Token::Everything
                } else {
                    Token::Directories
                });
            }
            '*' => tokens.push(Token::Star),
            '?' => tokens.push(Token::Question),
            '\\' => match chars.get(i) {
                Some(&next) => {
                    tokens.push(Token::Literal(next));
                    i += 1;
                }
                None => return Err(format!("pattern `{pattern}` ends with a lone `\\`")),
            },
            '[' => {
                let (token, next) = compile_class(&chars, i)
                    .ok_or_else(|| format!("pattern `{pattern}` has an unterminated `[`"))?;
                tokens.push(token);
                i = next;
            }
            other => tokens.push(Token::Literal(other)),
        }
    }
    Ok(tokens)
}

/// Parses a class whose `[` is just before `start`; returns it and the index after `]`.
fn compile_class(chars: &[char], start: usize) -> Option<(Token, usize)> {
    let mut i = start;
    let negated = chars.get(i) == Some(&'^');
    if negated {
        i += 1;
    }
    let mut ranges = Vec::new();
    let mut first = true;
    loop {
        let mut c = *chars.get(i)?;
        if c == ']' && !first {
            return Some((Token::Class { negated, ranges }, i + 1));
        }
        first = false;
        i += 1;
        if c == '\\' {
            c = *chars.get(i)?;
            i += 1;
        }
        let mut high = c;
        if chars.get(i) == Some(&'-') && chars.get(i + 1).is_some_and(|n| *n != ']') {
            high = chars[i + 1];
            i += 2;
            if high == '\\' {
                high = *chars.get(i)?;
                i += 1;
            }
        }
        ranges.push((c, high));
    }
}

/// Whether the whole of `path` matches `tokens` (a set-of-positions simulation: linear in
/// the pattern, so hostile patterns cannot make it backtrack exponentially).
fn matches(tokens: &[Token], path: &[char]) -> bool {
    let n = path.len();
    let mut at = vec![false; n + 1];
    at[0] = true;
    for token in tokens {
        let mut next = vec![false; n + 1];
        match token {
            Token::Literal(c) => {
                for i in (0..n).filter(|&i| at[i] && path[i] == *c) {
                    next[i + 1] = true;
                }
            }
            Token::Question => {
                for i in (0..n).filter(|&i| at[i] && path[i] != '/') {
                    next[i + 1] = true;
                }
            }
            Token::Class { negated, ranges } => {
                for i in (0..n).filter(|&i| at[i] && path[i] != '/') {
                    let inside = ranges.iter().any(|(lo, hi)| (*lo..=*hi).contains(&path[i]));
                    if inside != *negated {
                        next[i + 1] = true;
                    }
                }
            }
            Token::Star => {
                let mut run = false;
                for i in 0..=n {
                    run = at[i] || (run && path[i - 1] != '/');
                    next[i] = run;
                }
            }
            Token::Everything => {
                if let Some(first) = at.iter().position(|b| *b) {
                    next[first..].iter_mut().for_each(|b| *b = true);
                }
            }
            Token::Directories => {
                let mut reached = false;
                for i in 0..=n {
                    if i > 0 && reached && path[i - 1] == '/' {
                        next[i] = true;
                    }
                    if at[i] {
                        next[i] = true;
                        reached = true;
                    }
                }
            }
        }
        at = next;
    }
    at[n]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ignore(text: &str) -> DockerIgnore {
        DockerIgnore::parse(text).expect("valid .dockerignore")
    }

    #[test]
    fn parse_when_comments_and_blank_lines_then_only_patterns_remain() {
        let rules = ignore("# a comment\n\n   \n*.log\n");

        assert!(rules.is_ignored("x.log", false));
        assert!(!rules.is_ignored("# a comment", false));
        assert!(!rules.is_ignored("x.txt", false));
    }

    #[test]
    fn is_ignored_when_star_then_does_not_cross_directories() {
        let rules = ignore("*.log");

        assert!(rules.is_ignored("debug.log", false));
        assert!(!rules.is_ignored("logs/debug.log", false));
    }

    #[test]
    fn is_ignored_when_question_then_one_character() {
        let rules = ignore("file?.txt");

        assert!(rules.is_ignored("file1.txt", false));
        assert!(!rules.is_ignored("file10.txt", false));
        assert!(!rules.is_ignored("file/.txt", false));
    }

    #[test]
    fn is_ignored_when_class_then_ranges_and_negation() {
        let rules = ignore("v[0-9].txt\nx[^ab].txt");

        assert!(rules.is_ignored("v7.txt", false));
        assert!(!rules.is_ignored("va.txt", false));
        assert!(rules.is_ignored("xc.txt", false));
        assert!(!rules.is_ignored("xa.txt", false));
    }

    #[test]
    fn is_ignored_when_double_star_prefix_then_any_depth_including_root() {
        let rules = ignore("**/*.pyc");

        assert!(rules.is_ignored("a.pyc", false));
        assert!(rules.is_ignored("pkg/sub/a.pyc", false));
        assert!(!rules.is_ignored("pkg/a.py", false));
    }

    #[test]
    fn is_ignored_when_double_star_inside_then_zero_or_more_directories() {
        let rules = ignore("src/**/test");

        assert!(rules.is_ignored("src/test", true));
        assert!(rules.is_ignored("src/a/b/test", true));
        assert!(!rules.is_ignored("src/atest", true));
    }

    #[test]
    fn is_ignored_when_double_star_at_end_then_everything_below() {
        let rules = ignore("build/**");

        assert!(rules.is_ignored("build/x/y.o", false));
        assert!(!rules.is_ignored("builder", false));
    }

    #[test]
    fn is_ignored_when_leading_and_trailing_slash_then_stripped() {
        let rules = ignore("/node_modules/\n./tmp//cache");

        assert!(rules.is_ignored("node_modules", true));
        assert!(rules.is_ignored("tmp/cache", true));
    }

    #[test]
    fn is_ignored_when_directory_matches_then_everything_below_is_ignored() {
        let rules = ignore("docs");

        assert!(rules.is_ignored("docs", true));
        assert!(rules.is_ignored("docs/a/b/c.md", false));
        assert!(!rules.is_ignored("docsite/index.md", false));
    }

    #[test]
    fn is_ignored_when_exception_after_rule_then_path_is_included() {
        let rules = ignore("*.md\n!README.md");

        assert!(rules.is_ignored("CHANGES.md", false));
        assert!(!rules.is_ignored("README.md", false));
    }

    #[test]
    fn is_ignored_when_rule_after_exception_then_last_match_wins() {
        let rules = ignore("!README.md\n*.md");

        assert!(rules.is_ignored("README.md", false));
    }

    #[test]
    fn is_ignored_when_exception_below_ignored_directory_then_file_is_included() {
        let rules = ignore("docs\n!docs/keep.md");

        assert!(!rules.is_ignored("docs/keep.md", false));
        assert!(rules.is_ignored("docs/other.md", false));
        assert!(rules.has_exceptions());
    }

    #[test]
    fn is_ignored_when_escaped_metacharacter_then_literal() {
        let rules = ignore("a\\*b");

        assert!(rules.is_ignored("a*b", false));
        assert!(!rules.is_ignored("axb", false));
    }

    #[test]
    fn parse_when_unterminated_class_then_error_names_line() {
        let err = DockerIgnore::parse("ok\nbad[").expect_err("bad pattern");

        assert_eq!(err.line, 2);
        assert!(err.message.contains("unterminated"), "{err}");
    }

    #[test]
    fn is_ignored_when_hostile_pattern_then_answers_quickly() {
        let rules = ignore(&"*a".repeat(40));

        assert!(!rules.is_ignored(&format!("{}b", "a".repeat(200)), false));
    }
}
