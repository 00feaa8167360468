//! The progress of a build as `kiln build` shows it, read from the streamed build log:
//! a spinner with the current step on a terminal, plain lines otherwise. Everything goes to
//! stderr, so stdout carries only the result.

use std::collections::VecDeque;
use std::io::IsTerminal;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressStyle};

/// Log lines kept for the report of a failed build.
const TAIL_LINES: usize = 25;

/// One line of a kiln build log, as `kiln_image::build::BuildLog` writes them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LogLine {
    /// `==> step 3/7 (Dockerfile line 5): RUN make` → (3, 7, `RUN make`).
    Step(usize, usize, String),
    /// kiln's own narration, without its timestamp.
    Note(String),
    /// Output of a command or the app (`    | …`), without the bar.
    Output(String),
}

impl LogLine {
    /// Reads one line of the log.
    pub fn parse(line: &str) -> LogLine {
        if let Some(out) = line.strip_prefix("    | ") {
            return LogLine::Output(out.to_string());
        }
        if line == "    |" {
            return LogLine::Output(String::new());
        }
        let text = line
            .strip_prefix('[')
            .and_then(|rest| rest.split_once("s] "))
            .filter(|(stamp, _)| stamp.trim().parse::<f64>().is_ok())
            .map(|(_, text)| text)
            .unwrap_or(line);
        if let Some(step) = text.strip_prefix("==> step ") {
            if let Some((counts, rest)) = step.split_once(' ') {
                if let Some((i, n)) = counts.split_once('/') {
                    if let (Ok(i), Ok(n)) = (i.parse(), n.parse()) {
                        let instruction = rest.split_once("): ").map(|(_, t)| t).unwrap_or(rest);
                        return LogLine::Step(i, n, instruction.to_string());
                    }
                }
            }
        }
        LogLine::Note(text.to_string())
    }

    /// The line as `kiln build` prints it.
    fn display(&self) -> String {
        match self {
            LogLine::Step(i, n, text) => format!("[{i}/{n}] {text}"),
            LogLine::Note(t) => t.clone(),
            LogLine::Output(t) => format!("    | {t}"),
        }
    }
}

/// Follows a build's log and shows its progress.
pub struct BuildProgress {
    bar: Option<ProgressBar>,
    current: Option<String>,
    partial: Vec<u8>,
    tail: VecDeque<String>,
}

impl BuildProgress {
    /// A spinner when stderr is a terminal, plain lines otherwise.
    pub fn new() -> Self {
        let bar = std::io::stderr().is_terminal().then(|| {
            let bar = ProgressBar::new_spinner();
            bar.set_style(
                ProgressStyle::with_template("{spinner} {wide_msg} {elapsed:>4}")
                    .unwrap_or_else(|_| ProgressStyle::default_spinner()),
            );
            bar.enable_steady_tick(Duration::from_millis(120));
            bar.set_message("waiting for the build to start");
            bar
        });
        BuildProgress {
            bar,
            current: None,
            partial: Vec::new(),
            tail: VecDeque::new(),
        }
    }

    /// Takes the next bytes of the log.
    pub fn feed(&mut self, bytes: &[u8]) {
        self.partial.extend_from_slice(bytes);
        while let Some(pos) = self.partial.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = self.partial.drain(..=pos).collect();
            let text = String::from_utf8_lossy(&line[..line.len() - 1]).into_owned();
            self.line(&text);
        }
    }

    fn line(&mut self, raw: &str) {
        if self.tail.len() == TAIL_LINES {
            self.tail.pop_front();
        }
        self.tail.push_back(raw.to_string());
        let parsed = LogLine::parse(raw);
        let shown = match &parsed {
            LogLine::Output(_) => return,
            // "    cached", "    done in 2.0 s": how the step above ended.
            LogLine::Note(t) if t.starts_with("    ") => {
                let how = t.trim().trim_start_matches("done in ");
                if let Some(c) = self.current.as_mut() {
                    c.push_str(&format!(" ({how})"));
                }
                return;
            }
            // "app output so far:" introduces output lines, which are not shown.
            LogLine::Note(t) if t.ends_with(':') => return,
            other => other.display(),
        };
        match &self.bar {
            Some(bar) => {
                if let Some(done) = self.current.take() {
                    bar.println(format!("  {done}"));
                }
                bar.set_message(shown.clone());
                self.current = Some(shown);
            }
            None => {
                if let Some(done) = self.current.take() {
                    eprintln!("{done}");
                }
                self.current = Some(shown);
            }
        }
    }

    /// Ends the display; the last log lines, for a failure report.
    pub fn finish(mut self) -> Vec<String> {
        if !self.partial.is_empty() {
            let rest = String::from_utf8_lossy(&std::mem::take(&mut self.partial)).into_owned();
            self.line(&rest);
        }
        match self.bar.take() {
            Some(bar) => {
                if let Some(done) = self.current.take() {
                    bar.println(format!("  {done}"));
                }
                bar.finish_and_clear();
            }
            None => {
                if let Some(done) = self.current.take() {
                    eprintln!("{done}");
                }
            }
        }
        self.tail.into_iter().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_when_step_line_then_counts_and_instruction() {
        let line = "[  30.497s] ==> step 2/9 (Dockerfile line 5): RUN apt-get update";

        assert_eq!(
            LogLine::parse(line),
            LogLine::Step(2, 9, "RUN apt-get update".into())
        );
    }

    #[test]
    fn parse_when_narration_or_output_then_told_apart() {
        assert_eq!(
            LogLine::parse("[   2.557s] booting the build VM"),
            LogLine::Note("booting the build VM".into())
        );
        assert_eq!(
            LogLine::parse("    | Get:1 http://x"),
            LogLine::Output("Get:1 http://x".into())
        );
    }

    #[test]
    fn feed_when_split_across_chunks_then_lines_kept_whole() {
        let mut p = BuildProgress {
            bar: None,
            current: None,
            partial: Vec::new(),
            tail: VecDeque::new(),
        };

        p.feed(b"[ 0.1s] ==> step 1/2 (Dockerfile line 1): FROM kiln/bu");
        p.feed(b"sybox\n    | out\n[ 0.2s] BUILD FAI");
        p.feed(b"LED: no\n");
        let tail = p.finish();

        assert_eq!(tail.len(), 3);
        assert_eq!(tail[2], "[ 0.2s] BUILD FAILED: no");
    }
}
