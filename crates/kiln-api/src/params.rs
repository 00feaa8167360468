//! URI labels and query-string members: the parts of an input that are not in its body.
//!
//! [`crate::Operation::route`] yields the decoded labels as a map; the `…Params` structs
//! pick theirs out of it. List operations and `UntagResource` read their query string
//! into a `…Query` struct. Both implement [`crate::Validate`].

use std::collections::HashMap;

use crate::shapes::{Architecture, Chipset};
use crate::validate::{member_must, NOT_NULL};
use crate::ApiError;

fn label(labels: &HashMap<String, String>, name: &str) -> Result<String, ApiError> {
    labels
        .get(name)
        .cloned()
        .ok_or_else(|| member_must(name, NOT_NULL))
}

/// Labels of the paths under `/microvms/{microvmIdentifier}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MicrovmParams {
    /// The MicroVM's id or ARN.
    pub microvm_identifier: String,
}

/// Labels of `/microvm-images/{imageIdentifier}` and
/// `/managed-microvm-images/{imageIdentifier}/versions`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageParams {
    /// The image's name or ARN.
    pub image_identifier: String,
}

/// Labels of `/microvm-images/{imageIdentifier}/versions/{imageVersion}` and its
/// `/builds` list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageVersionParams {
    /// The image's name or ARN.
    pub image_identifier: String,
    /// The version.
    pub image_version: String,
}

/// Labels of `/microvm-images/{imageIdentifier}/versions/{imageVersion}/builds/{buildId}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageBuildParams {
    /// The image's name or ARN.
    pub image_identifier: String,
    /// The version.
    pub image_version: String,
    /// The build.
    pub build_id: String,
}

/// Label of `/2017-03-31/tags/{Resource}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TagsParams {
    /// The ARN of the resource whose tags are read or changed.
    pub resource: String,
}

/// Built from the decoded URI labels [`crate::Operation::route`] returns.
pub trait FromLabels: Sized {
    /// Picks this struct's labels out of `labels`.
    fn from_labels(labels: &HashMap<String, String>) -> Result<Self, ApiError>;
}

impl FromLabels for MicrovmParams {
    fn from_labels(labels: &HashMap<String, String>) -> Result<Self, ApiError> {
        Ok(MicrovmParams {
            microvm_identifier: label(labels, "microvmIdentifier")?,
        })
    }
}

impl FromLabels for ImageParams {
    fn from_labels(labels: &HashMap<String, String>) -> Result<Self, ApiError> {
        Ok(ImageParams {
            image_identifier: label(labels, "imageIdentifier")?,
        })
    }
}

impl FromLabels for ImageVersionParams {
    fn from_labels(labels: &HashMap<String, String>) -> Result<Self, ApiError> {
        Ok(ImageVersionParams {
            image_identifier: label(labels, "imageIdentifier")?,
            image_version: label(labels, "imageVersion")?,
        })
    }
}

impl FromLabels for ImageBuildParams {
    fn from_labels(labels: &HashMap<String, String>) -> Result<Self, ApiError> {
        Ok(ImageBuildParams {
            image_identifier: label(labels, "imageIdentifier")?,
            image_version: label(labels, "imageVersion")?,
            build_id: label(labels, "buildId")?,
        })
    }
}

impl FromLabels for TagsParams {
    fn from_labels(labels: &HashMap<String, String>) -> Result<Self, ApiError> {
        Ok(TagsParams {
            resource: label(labels, "Resource")?,
        })
    }
}

/// A struct read from, and written to, decoded query-string pairs.
pub trait QueryString: Sized {
    /// Reads the members from `pairs`; unknown keys are ignored, a repeated scalar key
    /// keeps its last value.
    fn from_query(pairs: &[(String, String)]) -> Result<Self, ApiError>;
    /// The pairs a client sends, members that are `None` left out.
    fn to_query(&self) -> Vec<(String, String)>;
}

fn last<'a>(pairs: &'a [(String, String)], key: &str) -> Option<&'a str> {
    pairs
        .iter()
        .rev()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.as_str())
}

fn last_string(pairs: &[(String, String)], key: &str) -> Option<String> {
    last(pairs, key).map(str::to_string)
}

fn last_int(pairs: &[(String, String)], key: &str) -> Result<Option<i32>, ApiError> {
    last(pairs, key)
        .map(|v| {
            v.trim()
                .parse::<i32>()
                .map_err(|_| member_must(key, "Member must be an integer"))
        })
        .transpose()
}

fn push(out: &mut Vec<(String, String)>, key: &str, value: Option<String>) {
    if let Some(v) = value {
        out.push((key.to_string(), v));
    }
}

/// The query of a list operation that only pages: `maxResults`, `nextToken`. Used by
/// `ListMicrovmImageVersions`, `ListManagedMicrovmImages`,
/// `ListManagedMicrovmImageVersions`, and inside the other list queries.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PageQuery {
    /// Largest page wanted, 1–50.
    pub max_results: Option<i32>,
    /// The token the previous page returned.
    pub next_token: Option<String>,
}

impl QueryString for PageQuery {
    fn from_query(pairs: &[(String, String)]) -> Result<Self, ApiError> {
        Ok(PageQuery {
            max_results: last_int(pairs, "maxResults")?,
            next_token: last_string(pairs, "nextToken"),
        })
    }

    fn to_query(&self) -> Vec<(String, String)> {
        let mut out = Vec::new();
        push(
            &mut out,
            "maxResults",
            self.max_results.map(|n| n.to_string()),
        );
        push(&mut out, "nextToken", self.next_token.clone());
        out
    }
}

/// Query of `ListMicrovmImageVersions`.
pub type ListMicrovmImageVersionsQuery = PageQuery;
/// Query of `ListManagedMicrovmImages`.
pub type ListManagedMicrovmImagesQuery = PageQuery;
/// Query of `ListManagedMicrovmImageVersions`.
pub type ListManagedMicrovmImageVersionsQuery = PageQuery;

/// Query of `ListMicrovmImages`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ListMicrovmImagesQuery {
    /// Paging.
    pub page: PageQuery,
    /// Only images whose name contains this.
    pub name_filter: Option<String>,
}

impl QueryString for ListMicrovmImagesQuery {
    fn from_query(pairs: &[(String, String)]) -> Result<Self, ApiError> {
        Ok(ListMicrovmImagesQuery {
            page: PageQuery::from_query(pairs)?,
            name_filter: last_string(pairs, "nameFilter"),
        })
    }

    fn to_query(&self) -> Vec<(String, String)> {
        let mut out = self.page.to_query();
        push(&mut out, "nameFilter", self.name_filter.clone());
        out
    }
}

/// Query of `ListMicrovmImageBuilds`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ListMicrovmImageBuildsQuery {
    /// Paging.
    pub page: PageQuery,
    /// Only builds for this instruction set.
    pub architecture: Option<Architecture>,
    /// Only builds on this processor family.
    pub chipset: Option<Chipset>,
    /// Only builds on this processor generation.
    pub chipset_generation: Option<String>,
}

impl QueryString for ListMicrovmImageBuildsQuery {
    fn from_query(pairs: &[(String, String)]) -> Result<Self, ApiError> {
        let architecture = last(pairs, "architecture")
            .map(|v| {
                v.parse::<Architecture>()
                    .map_err(|c| member_must("architecture", &c))
            })
            .transpose()?;
        let chipset = last(pairs, "chipset")
            .map(|v| v.parse::<Chipset>().map_err(|c| member_must("chipset", &c)))
            .transpose()?;
        Ok(ListMicrovmImageBuildsQuery {
            page: PageQuery::from_query(pairs)?,
            architecture,
            chipset,
            chipset_generation: last_string(pairs, "chipsetGeneration"),
        })
    }

    fn to_query(&self) -> Vec<(String, String)> {
        let mut out = self.page.to_query();
        push(
            &mut out,
            "architecture",
            self.architecture.map(|a| a.as_str().to_string()),
        );
        push(
            &mut out,
            "chipset",
            self.chipset.map(|c| c.as_str().to_string()),
        );
        push(
            &mut out,
            "chipsetGeneration",
            self.chipset_generation.clone(),
        );
        out
    }
}

/// Query of `ListMicrovms`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ListMicrovmsQuery {
    /// Paging.
    pub page: PageQuery,
    /// Only MicroVMs of this image (name or ARN).
    pub image_identifier: Option<String>,
    /// Only MicroVMs of this image version.
    pub image_version: Option<String>,
}

impl QueryString for ListMicrovmsQuery {
    fn from_query(pairs: &[(String, String)]) -> Result<Self, ApiError> {
        Ok(ListMicrovmsQuery {
            page: PageQuery::from_query(pairs)?,
            image_identifier: last_string(pairs, "imageIdentifier"),
            image_version: last_string(pairs, "imageVersion"),
        })
    }

    fn to_query(&self) -> Vec<(String, String)> {
        let mut out = self.page.to_query();
        push(&mut out, "imageIdentifier", self.image_identifier.clone());
        push(&mut out, "imageVersion", self.image_version.clone());
        out
    }
}

/// Query of `UntagResource`: the model member `TagKeys`, sent as repeated `tagKeys`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UntagResourceQuery {
    /// Keys of the tags to remove.
    pub tag_keys: Vec<String>,
}

impl QueryString for UntagResourceQuery {
    fn from_query(pairs: &[(String, String)]) -> Result<Self, ApiError> {
        let tag_keys: Vec<String> = pairs
            .iter()
            .filter(|(k, _)| k == "tagKeys")
            .map(|(_, v)| v.clone())
            .collect();
        if tag_keys.is_empty() {
            return Err(member_must("tagKeys", NOT_NULL));
        }
        Ok(UntagResourceQuery { tag_keys })
    }

    fn to_query(&self) -> Vec<(String, String)> {
        self.tag_keys
            .iter()
            .map(|k| ("tagKeys".to_string(), k.clone()))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pairs(raw: &str) -> Vec<(String, String)> {
        crate::uri::parse_query(raw)
    }

    #[test]
    fn builds_query_reads_enums_and_paging() {
        let q = ListMicrovmImageBuildsQuery::from_query(&pairs(
            "maxResults=5&architecture=X86_64&chipset=INTEL&nextToken=abc",
        ))
        .unwrap();
        assert_eq!(q.page.max_results, Some(5));
        assert_eq!(q.page.next_token.as_deref(), Some("abc"));
        assert_eq!(q.architecture, Some(Architecture::X86_64));
        assert_eq!(q.chipset, Some(Chipset::Intel));
    }

    #[test]
    fn unknown_enum_in_query_is_a_validation_error() {
        let err = ListMicrovmImageBuildsQuery::from_query(&pairs("architecture=MIPS")).unwrap_err();
        assert_eq!(
            err.message(),
            "1 validation error detected: Value at 'architecture' failed to satisfy constraint: \
             Member must satisfy enum value set: [ARM_64, X86_64]"
        );
    }

    #[test]
    fn non_numeric_max_results_is_a_validation_error() {
        let err = PageQuery::from_query(&pairs("maxResults=ten")).unwrap_err();
        assert_eq!(err.error_type(), "ValidationException");
    }

    #[test]
    fn untag_reads_every_repeated_key() {
        let q = UntagResourceQuery::from_query(&pairs("tagKeys=a&tagKeys=b")).unwrap();
        assert_eq!(q.tag_keys, vec!["a", "b"]);
        assert_eq!(UntagResourceQuery::from_query(&q.to_query()).unwrap(), q);
    }

    #[test]
    fn untag_without_keys_is_rejected() {
        let err = UntagResourceQuery::from_query(&[]).unwrap_err();
        assert!(err.message().contains("'tagKeys'"), "{}", err.message());
    }

    #[test]
    fn missing_label_is_a_validation_error() {
        let err = ImageVersionParams::from_labels(&HashMap::new()).unwrap_err();
        assert!(err.message().contains("Member must not be null"));
    }
}
