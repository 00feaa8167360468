//! Every program the workspace runs on the host is a line of `scripts/host-tools.tsv`.
//!
//! The scan reads every `.rs` file (src, tests, benches) for `Command::new("literal")`,
//! `Command::new(CONST)` and `tool::run*("name", …)` call sites, and every script under
//! `scripts/` for the programs its commands name; a program the table lacks fails the test,
//! so "installed by hand on the development machine" cannot pass CI again.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use kiln_vmm::host_tools::{lookup, HOST_TOOLS};

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// Files under `dir` whose names end with `ext` (`""`: all), `target/` and dot-dirs skipped.
fn files(dir: &Path, ext: &str, out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with('.') || name == "target" {
            continue;
        }
        if path.is_dir() {
            files(&path, ext, out);
        } else if name.ends_with(ext) {
            out.push(path);
        }
    }
}

// ---------------------------------------------------------------------------- Rust

/// The programs a Rust source file starts on the host.
fn rust_programs(text: &str) -> BTreeSet<String> {
    let mut found = BTreeSet::new();
    let process_command = text.contains("process::Command")
        || text.contains("process::{") && text.contains("Command")
        || text.contains("std::process::*");
    let clap_command = text.contains("clap::Command") || text.contains("clap::{");
    for (at, _) in text.match_indices("Command::new(") {
        let qualified = text[..at].ends_with("process::");
        if !qualified && (!process_command || clap_command) {
            continue;
        }
        if let Some(p) = first_argument(text, at + "Command::new(".len()) {
            found.insert(p);
        }
    }
    if text.contains("tool::") {
        for call in ["run(", "run_ok("] {
            for (at, _) in text.match_indices(call) {
                let before = text[..at].chars().next_back();
                if before.is_some_and(|c| c.is_alphanumeric() || c == '_' || c == '.') {
                    continue;
                }
                if let Some(p) = first_argument(text, at + call.len()) {
                    found.insert(p);
                }
            }
        }
    }
    found
}

/// The program a call's first argument names: a string literal, or a `const` of this file
/// holding one; `None` for any other expression.
fn first_argument(text: &str, from: usize) -> Option<String> {
    let rest = text[from..].trim_start();
    let rest = rest.strip_prefix('&').unwrap_or(rest).trim_start();
    let literal = if let Some(quoted) = rest.strip_prefix('"') {
        quoted.split('"').next()?.to_string()
    } else {
        let ident: String = rest
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        let after = rest[ident.len()..].trim_start();
        let is_const = !ident.is_empty()
            && ident
                .chars()
                .all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_')
            && (after.starts_with(')') || after.starts_with(','));
        if !is_const {
            return None;
        }
        const_value(text, &ident)?
    };
    let name = literal.rsplit('/').next().unwrap_or(&literal).to_string();
    (!name.is_empty()).then_some(name)
}

/// The string a `const NAME: &str = "…";` of this file holds.
fn const_value(text: &str, name: &str) -> Option<String> {
    let decl = format!("const {name}: &str =");
    let at = text.find(&decl)? + decl.len();
    let rest = text[at..].trim_start().strip_prefix('"')?;
    Some(rest.split('"').next()?.to_string())
}

// ---------------------------------------------------------------------------- shell

/// Shell words after which the next word is the command (or that stand alone).
const KEYWORDS: &[&str] = &[
    "if", "then", "else", "elif", "fi", "do", "done", "while", "until", "esac", "time", "!", "[[",
    "]]", "{", "}", "exec", "nohup",
];

/// Builtins: their arguments are not commands.
const BUILTINS: &[&str] = &[
    "echo",
    "printf",
    "cd",
    "test",
    "read",
    "set",
    "shift",
    "source",
    ".",
    "true",
    "false",
    "exit",
    "return",
    "trap",
    "wait",
    "eval",
    "let",
    "shopt",
    "unset",
    "type",
    "hash",
    "mapfile",
    "readarray",
    "compgen",
    "pwd",
    "kill",
    "getopts",
    "local",
    "declare",
    "export",
    "readonly",
    "builtin",
    "break",
    "continue",
    "umask",
    "ulimit",
    "jobs",
    "disown",
    ":",
    "[",
    "function",
];

/// The programs a shell script runs: the command word of every simple command, after
/// keywords, assignments and redirections, that is not a builtin, a function of the script,
/// or an expansion (`$X`, `"…"`); `command -v X` counts as running X.
fn shell_programs(script: &str) -> BTreeSet<String> {
    let functions: BTreeSet<String> = script
        .lines()
        .filter_map(|l| {
            let l = l.trim_start().trim_start_matches("function ").trim_start();
            let (name, rest) = l.split_once("()")?;
            let ok = !name.is_empty()
                && name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
            (ok && (rest.trim_start().starts_with('{') || rest.trim().is_empty()))
                .then(|| name.to_string())
        })
        .collect();
    let mut found = BTreeSet::new();
    let masked: String = mask_shell(script)
        .lines()
        .map(drop_case_pattern)
        .collect::<Vec<_>>()
        .join("\n");
    for segment in masked.split(['\n', ';', '&', '|', '(', ')', '`', '{', '}']) {
        let mut words = segment.split_whitespace().peekable();
        while let Some(word) = words.next() {
            match word {
                "for" | "case" | "select" | "in" => break,
                "command" if words.peek() == Some(&"-v") => {
                    words.next();
                    if let Some(p) = words.next().filter(|w| is_program(w)) {
                        found.insert(p.to_string());
                    }
                    break;
                }
                "env" => {
                    while let Some(w) = words.peek() {
                        if *w == "-u" {
                            words.next();
                            words.next();
                        } else if w.starts_with('-') || w.contains('=') {
                            words.next();
                        } else {
                            break;
                        }
                    }
                    continue;
                }
                w if BUILTINS.contains(&w) => break,
                w if KEYWORDS.contains(&w) || w.contains('=') => continue,
                w if w.starts_with(['>', '<']) || w.chars().all(|c| c.is_ascii_digit()) => continue,
                w => {
                    if is_program(w) && !functions.contains(w) {
                        found.insert(w.to_string());
                    }
                    break;
                }
            }
        }
    }
    found
}

/// A masked line without its leading `case` pattern (`a|b)`, `*)`), if it has one.
fn drop_case_pattern(line: &str) -> &str {
    match line.split_once(')') {
        Some((pattern, rest))
            if !pattern.trim().is_empty()
                && pattern.split('|').all(|alt| {
                    !alt.trim().is_empty() && !alt.trim().contains(char::is_whitespace)
                })
                && !pattern.contains('(') =>
        {
            rest
        }
        _ => line,
    }
}

/// A word that names a program on PATH (not an expansion, path, option or masked string).
fn is_program(word: &str) -> bool {
    word.chars().next().is_some_and(|c| c.is_ascii_alphabetic())
        && word
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '+'))
}

/// The script with comments, heredoc bodies, quoted text and arithmetic replaced by `_`,
/// line continuations joined, and `$(` … `)` kept as separate segments.
fn mask_shell(script: &str) -> String {
    #[derive(PartialEq)]
    enum In {
        Code,
        Single,
        Double,
    }
    let mut out = String::with_capacity(script.len());
    let mut stack = vec![In::Code];
    let mut heredoc: Option<String> = None;
    let mut pending_heredoc: Option<String> = None;
    for line in script.lines() {
        if let Some(end) = &heredoc {
            if line.trim() == end {
                heredoc = None;
            }
            out.push('\n');
            continue;
        }
        let chars: Vec<char> = line.chars().collect();
        let mut i = 0;
        while i < chars.len() {
            let c = chars[i];
            let next = chars.get(i + 1).copied();
            let top = stack.last().unwrap_or(&In::Code);
            match (top, c) {
                (In::Single, '\'') => {
                    stack.pop();
                    out.push('_');
                }
                (In::Single, _) => out.push('_'),
                (In::Double, '"') => {
                    stack.pop();
                    out.push('_');
                }
                (In::Double, '\\') => {
                    out.push_str("__");
                    i += 1;
                }
                (In::Double, '$') if next == Some('(') && chars.get(i + 2) != Some(&'(') => {
                    stack.push(In::Code);
                    out.push_str(";(");
                    i += 1;
                }
                (In::Double, _) => out.push('_'),
                (In::Code, '\\') if i + 1 == chars.len() => out.push(' '),
                (In::Code, '\\') => {
                    out.push('_');
                    i += 1;
                }
                (In::Code, '\'') => {
                    stack.push(In::Single);
                    out.push('_');
                }
                (In::Code, '"') => {
                    stack.push(In::Double);
                    out.push('_');
                }
                (In::Code, ')') if stack.len() > 1 => {
                    stack.pop();
                    out.push(')');
                }
                (In::Code, '#') if i == 0 || chars[i - 1].is_whitespace() => break,
                (In::Code, '(') if next == Some('(') || i > 0 && chars[i - 1] == '=' => {
                    // Arithmetic, or an array assignment's list: skip to the matching paren.
                    let mut depth = 0;
                    while i < chars.len() {
                        match chars[i] {
                            '(' => depth += 1,
                            ')' => depth -= 1,
                            _ => {}
                        }
                        out.push('_');
                        if depth == 0 {
                            break;
                        }
                        i += 1;
                    }
                }
                (In::Code, '$') if next == Some('(') && chars.get(i + 2) != Some(&'(') => {
                    stack.push(In::Code);
                    out.push_str(";(");
                    i += 1;
                }
                (In::Code, '$') => out.push('_'),
                (In::Code, '<') if next == Some('<') && chars.get(i + 2) != Some(&'<') => {
                    let rest: String = chars[i + 2..].iter().collect();
                    let word: String = rest
                        .trim_start_matches('-')
                        .trim_start()
                        .trim_matches(|c| c == '\'' || c == '"')
                        .chars()
                        .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                        .collect();
                    if !word.is_empty() {
                        pending_heredoc = Some(word);
                    }
                    out.push_str("<<");
                    i += 1;
                }
                (In::Code, _) => out.push(c),
            }
            i += 1;
        }
        let continued = line.ends_with('\\') && stack.last() == Some(&In::Code);
        if !continued && stack.last() != Some(&In::Single) && stack.last() != Some(&In::Double) {
            out.push('\n');
        } else {
            out.push(' ');
        }
        if let Some(word) = pending_heredoc.take() {
            heredoc = Some(word);
        }
    }
    out
}

// ---------------------------------------------------------------------------- the check

#[test]
fn host_tools_when_the_workspace_is_scanned_then_every_program_it_runs_is_in_the_table() {
    let root = workspace();
    let mut sources = Vec::new();
    files(&root.join("crates"), ".rs", &mut sources);
    let mut scripts = Vec::new();
    files(&root.join("scripts"), ".sh", &mut scripts);
    let mut missing = Vec::new();
    let mut seen = 0;

    for path in &sources {
        // The guest's own code runs inside the VM, on the image's programs, not the host's;
        // this file's samples are text, not calls.
        let this_file = path.ends_with("kiln-vmm/tests/host_tools.rs");
        if this_file || path.components().any(|c| c.as_os_str() == "guest") {
            continue;
        }
        let text = std::fs::read_to_string(path).expect("read a source file");
        for program in rust_programs(&text) {
            seen += 1;
            if lookup(&program).is_none() {
                missing.push(format!("{program} (run by {})", path.display()));
            }
        }
    }
    for path in &scripts {
        let text = std::fs::read_to_string(path).expect("read a script");
        for program in shell_programs(&text) {
            seen += 1;
            let own = ["kiln", "kilnd", "aws", "cargo"].contains(&program.as_str());
            if !own && lookup(&program).is_none() {
                missing.push(format!("{program} (run by {})", path.display()));
            }
        }
    }

    assert!(
        seen > 10,
        "the scan found only {seen} call sites: is it broken?"
    );
    assert!(
        missing.is_empty(),
        "programs run on the host but missing from scripts/host-tools.tsv (add a line naming \
         the Debian package): {missing:#?}"
    );
}

#[test]
fn host_tools_table_when_read_then_install_deps_reads_the_same_file() {
    let script = std::fs::read_to_string(workspace().join("scripts/install-deps.sh"))
        .expect("read install-deps.sh");

    assert!(script.contains("host-tools.tsv"));
    assert!(HOST_TOOLS.iter().any(|t| t.command == "debootstrap"));
}

// ---------------------------------------------------------------------------- the scanner

#[test]
fn rust_programs_when_calls_span_lines_or_use_consts_then_each_program_is_found() {
    let sample = r#"
use std::process::Command;
const TOOL: &str = "mke2fs";
fn a() {
    Command::new(
        "qemu-img",
    ).arg("create");
    Command::new(TOOL);
    tokio::process::Command::new("/usr/bin/debugfs");
    std::process::Command::new(&path);
    let out = tool::run_ok(
        "debootstrap",
        &mut cmd,
    );
    let x = run("apt-get", &mut cmd);
    prerun("not-a-tool", 1);
}
"#;

    let found = rust_programs(sample);

    let want: BTreeSet<String> = ["qemu-img", "mke2fs", "debugfs", "debootstrap", "apt-get"]
        .map(String::from)
        .into();
    assert_eq!(found, want);
}

#[test]
fn rust_programs_when_command_is_clap_then_nothing_is_found() {
    let sample = "use clap::Command;\nfn cli() { Command::new(\"kiln\"); }\n";

    assert!(rust_programs(sample).is_empty());
}

#[test]
fn shell_programs_when_a_script_runs_commands_then_programs_but_not_builtins_are_found() {
    let sample = r#"#!/usr/bin/env bash
# a comment naming notaprogram
die() { printf '%s\n' "$*" >&2; exit 1; }
free_port() {
    python3 -c 'import socket; print(1)'
}
key=$(awk '/x/ {print $3}' "$F")
[[ -x $KILN ]] || die "not built; run make"
if ! command -v qemu-img >/dev/null; then die x; fi
for f in a b c; do echo "$f"; done
local list=() name other
case "$x" in
A | B) sort -u ;;
esac
((SECTION > 0)) && echo yes
env -u A -u B X=1 "$BIN" --flag | grep -q ok && \
    curl -s http://127.0.0.1/ \
    -o /dev/null
cat <<EOF > out
heredocprogram runs nothing
EOF
"$AWS" s3 ls
"#;

    let found = shell_programs(sample);

    let want: BTreeSet<String> = ["python3", "awk", "qemu-img", "sort", "grep", "curl", "cat"]
        .map(String::from)
        .into();
    assert_eq!(found, want);
}
