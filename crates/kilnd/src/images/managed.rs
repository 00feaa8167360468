//! Managed base images: built on the host by kiln, named in Dockerfiles as `FROM kiln/…`,
//! and listed by `ListManagedMicrovmImages`.

use kiln_api::shapes::common::{Architecture, CpuConfiguration};
use kiln_api::shapes::image::{
    ManagedMicrovmImageSummary, ManagedMicrovmImageVersion, ManagedMicrovmImageVersionStatus,
};
use kiln_api::{ApiError, ArnContext, Timestamp};

/// One managed base image.
#[derive(Debug, Clone, Copy)]
pub struct Managed {
    /// Its name in ARNs (`arn:aws:lambda:<region>:aws:microvm-image:<name>`).
    pub name: &'static str,
    /// What a Dockerfile's FROM says to use it; empty for a VM base that takes any FROM.
    pub from: &'static [&'static str],
    /// Its one version.
    pub version: &'static str,
}

/// The managed bases kiln offers.
pub const MANAGED: &[Managed] = &[
    Managed {
        name: "debian-12",
        from: &["kiln/debian:12", "kiln/debian", "kiln/debian:bookworm"],
        version: "1",
    },
    Managed {
        name: "busybox",
        from: &["kiln/busybox", "kiln/busybox:latest"],
        version: "1",
    },
    // AWS's templates name this base (at any version) for every Dockerfile: there
    // `baseImageArn` picks the VM base (kernel, agent) and FROM the filesystem, so it means
    // kiln's own VM base under whatever the Dockerfile starts FROM.
    Managed {
        name: "al2023-1",
        from: &[],
        version: "0",
    },
];

/// Release date of the managed images (epoch seconds), for `createdAt`.
const RELEASED: i64 = 1_795_000_000;

/// The managed image an ARN names.
pub fn by_arn(arn: &str) -> Option<&'static Managed> {
    let image = kiln_api::image_identifier(arn).ok()?;
    if !image.is_managed() {
        return None;
    }
    MANAGED.iter().find(|m| m.name == image.name())
}

/// Checks that `baseImageArn` names a managed image (validation at request time).
pub fn validate_base(arn: &str) -> Result<&'static Managed, ApiError> {
    by_arn(arn).ok_or_else(|| {
        ApiError::validation(format!(
            "baseImageArn {arn} is not a managed image; use one of: {}",
            MANAGED
                .iter()
                .map(|m| ArnContext::default().managed_image_arn(m.name))
                .collect::<Vec<_>>()
                .join(", ")
        ))
    })
}

/// Checks at build time that the Dockerfile's FROM agrees with `baseImageArn`.
pub fn check_base(base_arn: &str, dockerfile: &str) -> Result<(), String> {
    let managed = by_arn(base_arn)
        .ok_or_else(|| format!("baseImageArn {base_arn} is not a managed image"))?;
    // The image's own base (the last stage's, through the stages it builds on); a Dockerfile
    // that does not parse fails its build with the parser's words instead.
    let Ok(from) = kiln_image::build::image_base(dockerfile) else {
        return Ok(());
    };
    let from = from.as_str();
    if managed.from.is_empty() || managed.from.contains(&from) {
        Ok(())
    } else {
        Err(format!(
            "the Dockerfile says FROM {from}, but baseImageArn names {}: use FROM {} (or change baseImageArn)",
            managed.name, managed.from[0]
        ))
    }
}

/// `ListManagedMicrovmImages` items.
pub fn summaries(ctx: &ArnContext) -> Vec<ManagedMicrovmImageSummary> {
    let mut v: Vec<_> = MANAGED
        .iter()
        .map(|m| ManagedMicrovmImageSummary {
            image_arn: ctx.managed_image_arn(m.name),
            created_at: Timestamp::from_secs(RELEASED),
            updated_at: None,
        })
        .collect();
    v.sort_by(|a, b| a.image_arn.cmp(&b.image_arn));
    v
}

/// `ListManagedMicrovmImageVersions` items.
pub fn versions(ctx: &ArnContext, m: &Managed) -> Vec<ManagedMicrovmImageVersion> {
    vec![ManagedMicrovmImageVersion {
        image_arn: ctx.managed_image_arn(m.name),
        image_version: m.version.to_string(),
        status: Some(ManagedMicrovmImageVersionStatus::Available),
        supported_cpu_configurations: Some(vec![CpuConfiguration {
            architecture: Architecture::X86_64,
        }]),
        created_at: Timestamp::from_secs(RELEASED),
        updated_at: None,
    }]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn check_base_when_from_matches_then_ok_else_says_what_to_write() {
        let arn = ArnContext::default().managed_image_arn("busybox");

        let ok = check_base(&arn, "# comment\nFROM kiln/busybox\nRUN true\n");
        let wrong = check_base(&arn, "FROM kiln/debian:12\n").expect_err("mismatch");

        assert!(ok.is_ok());
        assert!(wrong.contains("use FROM kiln/busybox"), "{wrong}");
    }

    #[test]
    fn check_base_when_stages_then_the_image_stages_base_counts() {
        let arn = ArnContext::default().managed_image_arn("busybox");
        let dockerfile = "FROM kiln/debian:12 AS tools\nFROM kiln/busybox AS app\nFROM app\n";

        let checked = check_base(&arn, dockerfile);

        assert!(checked.is_ok(), "{checked:?}");
    }

    #[test]
    fn check_base_when_awss_al2023_base_in_any_region_then_any_from() {
        let arn = "arn:aws:lambda:eu-west-1:aws:microvm-image:al2023-1";

        let debian = check_base(arn, "FROM kiln/debian:12\n");
        let busybox = check_base(arn, "FROM kiln/busybox\n");
        let validated = validate_base(arn).map(|m| m.name);

        assert!(debian.is_ok() && busybox.is_ok());
        assert_eq!(validated.ok(), Some("al2023-1"));
    }
}
