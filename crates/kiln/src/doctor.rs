//! `kiln doctor`: can this host run microVMs, and if not, what to install.

use std::path::Path;
use std::process::ExitCode;

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
    for (tool, pkg) in [
        ("qemu-img", "qemu-utils"),
        ("mke2fs", "e2fsprogs"),
        ("dpkg-deb", "dpkg"),
    ] {
        let (c, _) = check(
            tool,
            true,
            process::which(tool).ok_or_else(|| format!("{tool} is not on PATH")),
            |p| p.display().to_string(),
            &format!("apt-get install {pkg}"),
        );
        checks.push(c);
    }
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
