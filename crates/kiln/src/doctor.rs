//! `kiln doctor`: can this host run microVMs, and if not, what to install.

use std::path::Path;
use std::process::ExitCode;

use kiln_vmm::host_tools::{HostTool, NeededFor, HOST_TOOLS};
use kiln_vmm::{accel, assets, qemu::process, tsc};
use serde::Serialize;

use crate::Output;

/// One line of the report.
#[derive(Serialize)]
struct Check {
    name: &'static str,
    ok: bool,
    /// Whether VMs cannot run without it.
    required: bool,
    detail: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    fix: Option<String>,
}

/// One line of the host tools table, probed on this host.
#[derive(Serialize)]
struct ToolLine {
    #[serde(flatten)]
    tool: &'static HostTool,
    found: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    path: Option<std::path::PathBuf>,
    #[serde(skip_serializing_if = "Option::is_none")]
    fix: Option<String>,
}

impl ToolLine {
    fn probe(tool: &'static HostTool) -> ToolLine {
        let path = match tool.presence() {
            kiln_vmm::host_tools::Presence::Program(p) => process::which(p),
            _ => None,
        };
        let found = path.is_some() || tool.is_present();
        ToolLine {
            tool,
            found,
            path,
            fix: (!found).then(|| tool.install_hint()),
        }
    }

    /// `ok`, `MISS` (runtime), `warn` (build, test) or `-` (optional, absent).
    fn mark(&self) -> &'static str {
        match (self.found, self.tool.needed_for) {
            (true, _) => "ok  ",
            (false, NeededFor::Runtime) => "MISS",
            (false, NeededFor::Optional | NeededFor::Bench) => "-   ",
            (false, _) => "warn",
        }
    }
}

fn check<T>(
    name: &'static str,
    required: bool,
    result: Result<T, String>,
    detail: impl FnOnce(&T) -> String,
    fix: &str,
) -> (Check, Option<T>) {
    match result {
        Ok(v) => (
            Check {
                name,
                ok: true,
                required,
                detail: detail(&v),
                fix: None,
            },
            Some(v),
        ),
        Err(e) => (
            Check {
                name,
                ok: false,
                required,
                detail: e,
                fix: Some(fix.to_string()),
            },
            None,
        ),
    }
}

pub fn run(home: &Path, output: Output) -> anyhow::Result<ExitCode> {
    let mut checks = Vec::new();
    let (c, _) = check(
        "qemu",
        true,
        process::QemuBinary::find().map_err(|e| e.to_string()),
        |q| format!("QEMU {} ({})", q.version, q.path.display()),
        "apt-get install qemu-system-x86",
    );
    checks.push(c);
    let tools: Vec<ToolLine> = HOST_TOOLS.iter().map(ToolLine::probe).collect();
    // kilnd, kiln and the demo cannot work without a runtime tool.
    let runtime = |t: &&ToolLine| t.tool.needed_for == NeededFor::Runtime;
    let absent: Vec<&ToolLine> = tools.iter().filter(runtime).filter(|t| !t.found).collect();
    checks.push(Check {
        name: "host tools",
        ok: absent.is_empty(),
        required: true,
        detail: match absent.len() {
            0 => format!(
                "all {} runtime tools found",
                tools.iter().filter(runtime).count()
            ),
            _ => format!(
                "missing: {}",
                absent
                    .iter()
                    .map(|t| t.tool.command)
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        },
        fix: (!absent.is_empty()).then(|| {
            let mut pkgs: Vec<&str> = absent.iter().map(|t| t.tool.package).collect();
            pkgs.dedup();
            format!("apt-get install {} (or `make deps`)", pkgs.join(" "))
        }),
    });
    let probe = accel::probe_kvm();
    checks.push(Check {
        name: "kvm",
        ok: true,
        required: false,
        detail: format!(
            "{}{}",
            if probe.usable {
                "usable: "
            } else {
                "not used: "
            },
            probe.reason
        ),
        fix: None,
    });
    let (c, _) = check(
        "accelerator",
        true,
        accel::choose_accel(home).map_err(|e| e.to_string()),
        |a| format!("{} ({})", a.accel, a.reason),
        "unset KILN_ACCEL or set it to kvm or tcg",
    );
    checks.push(c);
    let (c, _) = check(
        "tsc",
        true,
        tsc::host_tsc_khz(home).map_err(|e| e.to_string()),
        |k| format!("{k} kHz (passed to guests as tsc_early_khz)"),
        "set KILN_TSC_KHZ to the host's TSC frequency in kHz",
    );
    checks.push(c);
    let (c, kernel) = check(
        "guest kernel",
        true,
        assets::ensure_kernel(home).map_err(|e| e.to_string()),
        |k| format!("{} from {} {}", k.version, k.package, k.package_version),
        "run `apt-get update`, then `kiln doctor` again (it fetches the kernel)",
    );
    checks.push(c);
    let (c, init) = check(
        "kiln-init",
        true,
        assets::find_kiln_init().map_err(|e| e.to_string()),
        |p| p.display().to_string(),
        "run `make` (it builds the static kiln-init)",
    );
    checks.push(c);
    if let (Some(kernel), Some(init)) = (kernel, init) {
        let (c, _) = check(
            "initramfs",
            true,
            assets::ensure_initramfs(home, &kernel, &init).map_err(|e| e.to_string()),
            |i| i.path.display().to_string(),
            "see the error above",
        );
        checks.push(c);
    }
    let (c, _) = check(
        "confinement",
        false,
        kiln_vmm::jail::summary(),
        |s| s.clone(),
        "run kiln and kilnd as root, and leave KILN_JAIL unset",
    );
    checks.push(c);
    let (c, _) = check(
        "vcpu growth",
        false,
        kiln_vmm::cgroup::growth_support(),
        |s| {
            let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
            format!(
                "{s}; busy MicroVMs grow to 4x their baseline within a budget of {} vCPUs \
                 (16 per host CPU; kilnd --max-vcpus, --vcpu-growth off)",
                16 * cpus
            )
        },
        "optional: mount the cpu and cpuacct cgroup controllers (or cgroup v2) for MicroVMs to grow",
    );
    checks.push(c);
    let (c, _) = check(
        "memory growth",
        false,
        kiln_vmm::cgroup::memory_growth_support(),
        |s| {
            format!(
                "{s}; q35 MicroVMs (kilnd's default machine) short of memory grow to 4x their \
                 baseline within kilnd's memory budget (kilnd --max-memory-mib, --memory-growth off)"
            )
        },
        "optional: mount the memory cgroup controller (or cgroup v2) for MicroVMs to grow",
    );
    checks.push(c);
    let (c, _) = check(
        "ksm",
        false,
        kiln_vmm::ksm::stats().ok_or_else(|| "this kernel has no KSM".to_string()),
        |k| match k.running {
            true => format!(
                "on: {} pages merged into {} (kilnd --ksm)",
                k.pages_sharing, k.pages_shared
            ),
            false => "off (kilnd --ksm turns it on to merge identical guest pages)".to_string(),
        },
        "optional: a kernel with CONFIG_KSM lets kilnd --ksm merge identical guest pages",
    );
    checks.push(c);
    let open = kiln_vmm::home::open_dirs(home);
    checks.push(Check {
        name: "data directory",
        ok: open.is_empty(),
        required: false,
        detail: match open.first() {
            None => format!("{} and everything under it is 0700", home.display()),
            Some(d) => format!(
                "{} directories others can enter, e.g. {}",
                open.len(),
                d.display()
            ),
        },
        fix: (!open.is_empty()).then(|| "start kilnd once (it narrows them to 0700)".to_string()),
    });
    let (c, _) = check(
        "busybox base",
        false,
        kiln_image::base::busybox::ensure(home).map_err(|e| e.to_string()),
        |b| format!("{} {} ({})", b.name, b.version, b.disk.display()),
        "run `apt-get update`, then `kiln doctor` again",
    );
    checks.push(c);

    let can_run = checks.iter().all(|c| c.ok || !c.required);
    match output {
        Output::Json => println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({
                "can_run_microvms": can_run, "home": home, "checks": checks,
                "host_tools": tools,
            }))?
        ),
        Output::Table => {
            let width = checks.iter().map(|c| c.name.len()).max().unwrap_or(0);
            for c in &checks {
                let mark = if c.ok {
                    "ok  "
                } else if c.required {
                    "FAIL"
                } else {
                    "warn"
                };
                println!("{mark}  {:<width$}  {}", c.name, c.detail);
                if let Some(fix) = &c.fix {
                    println!("      {:<width$}  → {fix}", "");
                }
            }
            println!();
            println!("Host tools (scripts/host-tools.tsv; `make deps` installs all but optional):");
            let cw = tools
                .iter()
                .map(|t| t.tool.command.len())
                .max()
                .unwrap_or(0);
            let pw = tools
                .iter()
                .map(|t| t.tool.package.len())
                .max()
                .unwrap_or(0);
            for t in &tools {
                let detail = match (&t.path, &t.fix) {
                    (_, Some(fix)) => format!("→ {fix}"),
                    (Some(path), None) => path.display().to_string(),
                    (None, None) => "present".to_string(),
                };
                println!(
                    "{}  {:<cw$}  {:<pw$}  {:<8}  {detail}",
                    t.mark(),
                    t.tool.command,
                    t.tool.package,
                    t.tool.needed_for.as_str(),
                );
            }
            println!();
            if can_run {
                println!("This host can run microVMs (data in {}).", home.display());
            } else {
                println!("This host cannot run microVMs yet: fix the FAIL lines above.");
            }
        }
    }
    Ok(if can_run {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
