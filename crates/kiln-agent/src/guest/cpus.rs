//! The guest's vCPUs, online or offline through sysfs. The host boots an app VM with more
//! vCPUs present than it grants (QEMU's microvm machine has no vCPU hotplug) and asks the
//! agent to online or offline them as its grant changes. Onlining is the guest's side only:
//! the host's cgroup quota is what holds the VM to its grant, whatever the guest onlines.

use std::collections::BTreeSet;
use std::path::Path;

/// Where the kernel lists and switches vCPUs.
const SYSFS_CPUS: &str = "/sys/devices/system/cpu";
/// Highest vCPU number a list may name (far above any VM kiln starts); bounds parsing.
const MAX_CPU_ID: u32 = 8191;

/// How many vCPUs are online and present.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CpuCount {
    /// Online now.
    pub online: u32,
    /// Present (online or not).
    pub present: u32,
}

/// Parses a kernel CPU list (`0-3,5`, `0`, or empty) into its vCPU numbers, in order.
pub fn parse_list(text: &str) -> Result<BTreeSet<u32>, String> {
    let mut cpus = BTreeSet::new();
    for part in text.trim().split(',').filter(|p| !p.is_empty()) {
        let (first, last) = match part.split_once('-') {
            Some((a, b)) => (number(a)?, number(b)?),
            None => (number(part)?, number(part)?),
        };
        if first > last {
            return Err(format!("{part:?} is not a CPU range"));
        }
        cpus.extend(first..=last);
    }
    Ok(cpus)
}

fn number(text: &str) -> Result<u32, String> {
    match text.trim().parse::<u32>() {
        Ok(n) if n <= MAX_CPU_ID => Ok(n),
        _ => Err(format!("{text:?} is not a CPU number (0–{MAX_CPU_ID})")),
    }
}

/// The switches that leave `count` of `present` online, given those `online` now: cpu0 and
/// the lowest-numbered others stay or come up; the rest go down, highest first. Each item is
/// (cpu, online?). Err for a count outside 1..=present.
pub fn plan(
    present: &BTreeSet<u32>,
    online: &BTreeSet<u32>,
    count: u32,
) -> Result<Vec<(u32, bool)>, String> {
    let total = u32::try_from(present.len()).unwrap_or(u32::MAX);
    if count == 0 || count > total {
        return Err(format!(
            "cannot have {count} vCPUs online: the guest has {total} (1 to {total} may be online)"
        ));
    }
    let wanted: BTreeSet<u32> = present.iter().copied().take(count as usize).collect();
    let up = present
        .iter()
        .filter(|c| wanted.contains(c) && !online.contains(c))
        .map(|c| (*c, true));
    let down = present
        .iter()
        .rev()
        .filter(|c| !wanted.contains(c) && online.contains(c))
        .map(|c| (*c, false));
    Ok(up.chain(down).collect())
}

fn read_list(name: &str) -> Result<BTreeSet<u32>, String> {
    let path = Path::new(SYSFS_CPUS).join(name);
    let text = std::fs::read_to_string(&path)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    parse_list(&text).map_err(|e| format!("{}: {e}", path.display()))
}

/// How many vCPUs the guest has online and present.
pub fn status() -> Result<CpuCount, String> {
    let (online, present) = (read_list("online")?, read_list("present")?);
    Ok(CpuCount {
        online: u32::try_from(online.len()).unwrap_or(u32::MAX),
        present: u32::try_from(present.len()).unwrap_or(u32::MAX),
    })
}

/// Onlines or offlines vCPUs until `count` are online (see [`plan`]); what is online after.
pub fn set_online(count: u32) -> Result<CpuCount, String> {
    let (online, present) = (read_list("online")?, read_list("present")?);
    for (cpu, up) in plan(&present, &online, count)? {
        let path = Path::new(SYSFS_CPUS).join(format!("cpu{cpu}/online"));
        std::fs::write(&path, if up { "1" } else { "0" }).map_err(|e| {
            let verb = if up { "online" } else { "offline" };
            format!("cannot {verb} vCPU {cpu} ({}): {e}", path.display())
        })?;
    }
    status()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(cpus: &[u32]) -> BTreeSet<u32> {
        cpus.iter().copied().collect()
    }

    #[test]
    fn parse_list_when_ranges_and_singles_then_every_number() {
        assert_eq!(parse_list("0-3,5\n"), Ok(set(&[0, 1, 2, 3, 5])));
        assert_eq!(parse_list("0\n"), Ok(set(&[0])));
        assert_eq!(parse_list("\n"), Ok(set(&[])));
    }

    #[test]
    fn parse_list_when_garbage_then_an_error() {
        for bad in ["3-1", "a", "0-99999999", "-", "1-", "0--2"] {
            assert!(parse_list(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn plan_when_growing_then_the_lowest_offline_come_up_in_order() {
        let steps = plan(&set(&[0, 1, 2, 3]), &set(&[0]), 3);

        assert_eq!(steps, Ok(vec![(1, true), (2, true)]));
    }

    #[test]
    fn plan_when_shrinking_then_the_highest_go_down_first_and_cpu0_stays() {
        let steps = plan(&set(&[0, 1, 2, 3]), &set(&[0, 1, 2, 3]), 1);

        assert_eq!(steps, Ok(vec![(3, false), (2, false), (1, false)]));
    }

    #[test]
    fn plan_when_count_outside_the_present_then_refused() {
        assert!(plan(&set(&[0, 1]), &set(&[0]), 0).is_err());
        assert!(plan(&set(&[0, 1]), &set(&[0]), 3).is_err());
    }

    mod properties {
        use super::*;
        use proptest::prelude::*;

        proptest! {
            #[test]
            fn plan_when_applied_then_exactly_count_online_with_the_lowest_first(
                present in proptest::collection::btree_set(0u32..64, 1..16),
                online_mask in any::<u64>(),
                count in 0u32..20,
            ) {
                let online: BTreeSet<u32> =
                    present.iter().copied().filter(|c| online_mask >> c & 1 == 1).collect();

                let result = plan(&present, &online, count);

                let total = present.len() as u32;
                prop_assert_eq!(result.is_ok(), (1..=total).contains(&count));
                if let Ok(steps) = result {
                    let mut after = online.clone();
                    for (cpu, up) in steps {
                        prop_assert!(present.contains(&cpu));
                        if up { after.insert(cpu); } else { after.remove(&cpu); }
                    }
                    let lowest: BTreeSet<u32> =
                        present.iter().copied().take(count as usize).collect();
                    prop_assert_eq!(after, lowest);
                }
            }

            #[test]
            fn parse_list_when_arbitrary_text_then_never_panics(text in ".{0,64}") {
                let _ = parse_list(&text);
            }
        }
    }
}
