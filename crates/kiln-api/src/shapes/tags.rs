//! Tag operations, which keep Lambda's 2017-03-31 paths and PascalCase members.

use serde::{Deserialize, Serialize};

use super::common::Tags;

/// Body of `TagResource` (model `TagResourceRequest`); the resource ARN is the
/// `Resource` URI label ([`crate::params::TagsParams`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct TagResourceRequest {
    /// Tags to add or overwrite.
    pub tags: Tags,
}

/// Output of `ListTags` (model `ListTagsResponse`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct ListTagsResponse {
    /// The resource's tags.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tags: Option<Tags>,
}
