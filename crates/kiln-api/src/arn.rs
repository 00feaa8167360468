//! kiln's ARNs and the identifiers operations accept (a name or an ARN).
//!
//! Scheme, fixed for every resource kiln owns:
//!
//! | resource            | ARN                                                    |
//! |---------------------|--------------------------------------------------------|
//! | own image           | `arn:aws:lambda:<region>:<account>:microvm-image:<name>` |
//! | managed base image  | `arn:aws:lambda:<region>:aws:microvm-image:<name>`     |
//! | MicroVM             | `arn:aws:lambda:<region>:<account>:microvm:<id>`       |
//!
//! Managed images use the literal account `aws`, which the model's `MicrovmImageArn`
//! pattern (`[a-z0-9]*` account) admits. Image versions are never part of an ARN: the
//! API always carries them in a separate `imageVersion` member.

use std::fmt;
use std::str::FromStr;

use crate::validate::{member_must, IMAGE_NAME};
use crate::ApiError;

/// The account that owns managed base images.
pub const MANAGED_ACCOUNT: &str = "aws";

/// The region and account kiln presents itself as.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ArnContext {
    /// Region in every ARN, `local` by default.
    pub region: String,
    /// kiln's own account (its administrator's, and the operator's network connectors'),
    /// `000000000000` by default. Other principals' resources carry their own accounts.
    pub account: String,
}

impl Default for ArnContext {
    fn default() -> Self {
        ArnContext {
            region: "local".to_string(),
            account: "000000000000".to_string(),
        }
    }
}

impl ArnContext {
    /// The ARN of image `name` in kiln's own account.
    pub fn image_arn(&self, name: &str) -> String {
        self.image_arn_in(&self.account, name)
    }

    /// The ARN of image `name` in `account`.
    pub fn image_arn_in(&self, account: &str, name: &str) -> String {
        ImageArn {
            region: self.region.clone(),
            account: account.into(),
            name: name.into(),
        }
        .to_string()
    }

    /// The ARN of the managed base image `name`.
    pub fn managed_image_arn(&self, name: &str) -> String {
        ImageArn {
            region: self.region.clone(),
            account: MANAGED_ACCOUNT.into(),
            name: name.into(),
        }
        .to_string()
    }

    /// The ARN of MicroVM `id` in kiln's own account.
    pub fn microvm_arn(&self, id: &str) -> String {
        self.microvm_arn_in(&self.account, id)
    }

    /// The ARN of MicroVM `id` in `account`.
    pub fn microvm_arn_in(&self, account: &str, id: &str) -> String {
        format!("arn:aws:lambda:{}:{account}:microvm:{id}", self.region)
    }
}

/// A parsed image ARN.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ImageArn {
    /// Region part.
    pub region: String,
    /// Account part; [`MANAGED_ACCOUNT`] for managed images.
    pub account: String,
    /// The image's name.
    pub name: String,
}

impl ImageArn {
    /// Whether this names a managed base image.
    pub fn is_managed(&self) -> bool {
        self.account == MANAGED_ACCOUNT
    }

    /// Whether this image lives in `ctx`'s region (in any account, or managed).
    pub fn is_local_to(&self, ctx: &ArnContext) -> bool {
        self.region == ctx.region
    }
}

impl fmt::Display for ImageArn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "arn:aws:lambda:{}:{}:microvm-image:{}",
            self.region, self.account, self.name
        )
    }
}

/// Why a string is not an ARN kiln understands.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("'{arn}' is not a MicroVM image ARN: {reason}")]
pub struct ArnError {
    /// The rejected text.
    pub arn: String,
    /// What is wrong with it.
    pub reason: &'static str,
}

/// Splits `arn:<partition>:lambda:<region>:<account>:<kind>:<rest>`.
fn split_arn(s: &str) -> Option<(&str, &str, &str, &str)> {
    let mut parts = s.splitn(6, ':');
    let (arn, partition, service) = (parts.next()?, parts.next()?, parts.next()?);
    let (region, account, resource) = (parts.next()?, parts.next()?, parts.next()?);
    if arn != "arn" || !partition.starts_with("aws") || service != "lambda" {
        return None;
    }
    let (kind, rest) = resource.split_once(':')?;
    Some((region, account, kind, rest))
}

impl FromStr for ImageArn {
    type Err = ArnError;

    fn from_str(s: &str) -> Result<Self, ArnError> {
        let err = |reason| ArnError {
            arn: s.to_string(),
            reason,
        };
        let (region, account, kind, name) = split_arn(s).ok_or_else(|| {
            err("expected arn:aws:lambda:<region>:<account>:microvm-image:<name>")
        })?;
        if kind != "microvm-image" {
            return Err(err("the resource type is not microvm-image"));
        }
        if region.is_empty()
            || !region
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        {
            return Err(err("the region must be lower-case letters, digits and '-'"));
        }
        if !(account == MANAGED_ACCOUNT
            || (account.len() == 12 && account.bytes().all(|b| b.is_ascii_digit())))
        {
            return Err(err("the account must be 12 digits or 'aws'"));
        }
        if name.len() > 64 || !IMAGE_NAME.matches(name) {
            return Err(err("the name must be 1-64 of [a-zA-Z0-9-_]"));
        }
        Ok(ImageArn {
            region: region.into(),
            account: account.into(),
            name: name.into(),
        })
    }
}

/// What an `imageIdentifier` names: an image by name (the caller's own) or by ARN.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum ImageRef {
    /// A bare name, meaning the caller's image.
    Name(String),
    /// A full ARN, the caller's or a managed one.
    Arn(ImageArn),
}

impl ImageRef {
    /// The image's name either way.
    pub fn name(&self) -> &str {
        match self {
            ImageRef::Name(n) => n,
            ImageRef::Arn(a) => &a.name,
        }
    }

    /// Whether this names a managed base image.
    pub fn is_managed(&self) -> bool {
        matches!(self, ImageRef::Arn(a) if a.is_managed())
    }

    /// The full ARN, a bare name taken as the caller's image in `ctx`.
    pub fn to_arn(&self, ctx: &ArnContext) -> String {
        match self {
            ImageRef::Name(n) => ctx.image_arn(n),
            ImageRef::Arn(a) => a.to_string(),
        }
    }

    /// The account and name of the image this names for a caller in `account`: a bare
    /// name is the caller's; `None` for a managed image or another region's.
    pub fn in_account<'a>(
        &'a self,
        ctx: &ArnContext,
        account: &'a str,
    ) -> Option<(&'a str, &'a str)> {
        match self {
            ImageRef::Name(n) => Some((account, n)),
            ImageRef::Arn(a) if a.is_managed() || !a.is_local_to(ctx) => None,
            ImageRef::Arn(a) => Some((&a.account, &a.name)),
        }
    }
}

/// Reads an `imageIdentifier`: an ARN when it starts with `arn:`, else a name.
pub fn image_identifier(s: &str) -> Result<ImageRef, ApiError> {
    if s.starts_with("arn:") {
        return s
            .parse::<ImageArn>()
            .map(ImageRef::Arn)
            .map_err(|e| ApiError::validation(e.to_string()));
    }
    if s.is_empty() || s.len() > 64 || !IMAGE_NAME.matches(s) {
        return Err(member_must(
            "imageIdentifier",
            &format!(
                "Member must be an image ARN or a name satisfying regular expression pattern: {}",
                IMAGE_NAME.model
            ),
        ));
    }
    Ok(ImageRef::Name(s.to_string()))
}

/// Reads a `microvmIdentifier`: a MicroVM id, or its ARN (whose last part is the id).
pub fn microvm_identifier(s: &str) -> Result<String, ApiError> {
    if !s.starts_with("arn:") {
        return Ok(s.to_string());
    }
    match split_arn(s) {
        Some((_, _, "microvm", id)) if !id.is_empty() => Ok(id.to_string()),
        _ => Err(ApiError::validation(format!(
            "'{s}' is not a MicroVM ARN: expected arn:aws:lambda:<region>:<account>:microvm:<id>"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_context_formats_kiln_arns() {
        let ctx = ArnContext::default();
        assert_eq!(
            ctx.image_arn("web"),
            "arn:aws:lambda:local:000000000000:microvm-image:web"
        );
        assert_eq!(
            ctx.managed_image_arn("al2023"),
            "arn:aws:lambda:local:aws:microvm-image:al2023"
        );
        assert_eq!(
            ctx.microvm_arn("mvm-1"),
            "arn:aws:lambda:local:000000000000:microvm:mvm-1"
        );
    }

    #[test]
    fn image_arn_round_trips() {
        let s = "arn:aws:lambda:us-east-1:123456789012:microvm-image:web";
        let arn: ImageArn = s.parse().unwrap();
        assert_eq!(arn.name, "web");
        assert!(!arn.is_managed());
        assert_eq!(arn.to_string(), s);
    }

    #[test]
    fn identifier_accepts_name_and_arn() {
        let ctx = ArnContext::default();
        assert_eq!(
            image_identifier("web").unwrap(),
            ImageRef::Name("web".into())
        );
        let managed = image_identifier(&ctx.managed_image_arn("al2023")).unwrap();
        assert!(managed.is_managed());
        assert_eq!(managed.name(), "al2023");
        assert_eq!(
            image_identifier("web").unwrap().to_arn(&ctx),
            ctx.image_arn("web")
        );
    }

    #[test]
    fn in_account_when_name_then_the_callers_and_when_arn_then_its_own() {
        let ctx = ArnContext::default();
        let theirs = "arn:aws:lambda:local:000000000002:microvm-image:app";

        let bare = image_identifier("app").unwrap();
        let arn = image_identifier(theirs).unwrap();
        let managed = image_identifier(&ctx.managed_image_arn("al2023")).unwrap();
        let elsewhere =
            image_identifier("arn:aws:lambda:us-east-1:000000000002:microvm-image:app").unwrap();

        assert_eq!(
            bare.in_account(&ctx, "000000000001"),
            Some(("000000000001", "app"))
        );
        assert_eq!(
            arn.in_account(&ctx, "000000000001"),
            Some(("000000000002", "app"))
        );
        assert_eq!(managed.in_account(&ctx, "000000000001"), None);
        assert_eq!(elsewhere.in_account(&ctx, "000000000001"), None);
        assert_eq!(ctx.image_arn_in("000000000002", "app"), theirs);
    }

    #[test]
    fn identifier_rejects_bad_arn_and_bad_name() {
        assert!(image_identifier("arn:aws:lambda:local:000000000000:microvm:x").is_err());
        assert!(image_identifier("arn:aws:s3:::bucket").is_err());
        assert!(image_identifier("has space").is_err());
        assert!(image_identifier("").is_err());
    }

    #[test]
    fn microvm_identifier_strips_arn() {
        let ctx = ArnContext::default();
        assert_eq!(
            microvm_identifier(&ctx.microvm_arn("mvm-9")).unwrap(),
            "mvm-9"
        );
        assert_eq!(microvm_identifier("mvm-9").unwrap(), "mvm-9");
        assert!(microvm_identifier("arn:aws:lambda:local:000000000000:microvm-image:web").is_err());
    }
}
