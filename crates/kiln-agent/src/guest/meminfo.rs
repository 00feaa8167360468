//! The guest's memory as its kernel counts it, for the host's memory sizer: the host plugs
//! memory into a guest short of it and takes back what it does not need.

/// Where the kernel reports memory.
const MEMINFO: &str = "/proc/meminfo";

/// The guest's memory now, KiB.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Meminfo {
    /// `MemTotal`: all the memory the kernel manages (plugged memory included).
    pub total_kib: u64,
    /// `MemAvailable`: what new work could get without swapping.
    pub available_kib: u64,
}

/// Reads [`MEMINFO`].
pub fn read() -> Result<Meminfo, String> {
    let text = std::fs::read_to_string(MEMINFO).map_err(|e| format!("reading {MEMINFO}: {e}"))?;
    parse(&text)
}

/// Parses `/proc/meminfo`'s text: `Name:   1234 kB` lines.
pub fn parse(text: &str) -> Result<Meminfo, String> {
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
            .and_then(|rest| {
                rest.trim()
                    .trim_end_matches("kB")
                    .trim()
                    .parse::<u64>()
                    .ok()
            })
            .ok_or_else(|| format!("{MEMINFO} has no readable {name}"))
    };
    Ok(Meminfo {
        total_kib: field("MemTotal")?,
        available_kib: field("MemAvailable")?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_when_the_kernels_text_then_total_and_available() {
        let text = "MemTotal:         497712 kB\nMemFree:          402316 kB\n\
                    MemAvailable:     437944 kB\nBuffers:               0 kB\n";

        let m = parse(text).expect("parses");

        assert_eq!(
            m,
            Meminfo {
                total_kib: 497_712,
                available_kib: 437_944
            }
        );
    }

    #[test]
    fn parse_when_a_field_is_missing_or_garbled_then_an_error_naming_it() {
        let missing = parse("MemTotal: 100 kB\n").expect_err("no MemAvailable");
        let garbled = parse("MemTotal: lots kB\nMemAvailable: 5 kB\n").expect_err("garbled");

        assert!(missing.contains("MemAvailable"), "{missing}");
        assert!(garbled.contains("MemTotal"), "{garbled}");
    }

    #[test]
    fn read_when_on_linux_then_available_is_within_total() {
        let m = read().expect("this host has /proc/meminfo");

        assert!(m.total_kib > 0 && m.available_kib <= m.total_kib, "{m:?}");
    }
}
