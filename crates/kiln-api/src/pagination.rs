//! Opaque `nextToken`s: the sort key of the last item a page returned.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;

use crate::ApiError;

/// Page size when a request gives no `maxResults`, and the largest it may ask for.
pub const MAX_RESULTS: usize = 50;

const PREFIX: &str = "kiln1:";

/// The token that resumes a listing after the item keyed `last_key`.
pub fn encode_token(last_key: &str) -> String {
    URL_SAFE_NO_PAD.encode(format!("{PREFIX}{last_key}"))
}

/// The key a token resumes after; a `ValidationException` if kiln did not make it.
pub fn decode_token(token: &str) -> Result<String, ApiError> {
    let bad = || {
        ApiError::validation(format!("Invalid nextToken '{token}': pass back a nextToken exactly as a previous response returned it"))
    };
    let bytes = URL_SAFE_NO_PAD.decode(token).map_err(|_| bad())?;
    let text = String::from_utf8(bytes).map_err(|_| bad())?;
    text.strip_prefix(PREFIX)
        .map(str::to_string)
        .ok_or_else(bad)
}

/// One page of `items`, which must be sorted by `key`: those after the token's key, at
/// most `max_results` (default [`MAX_RESULTS`]), and the token for the next page if
/// more remain.
pub fn paginate<T: Clone>(
    items: &[T],
    key: impl Fn(&T) -> &str,
    max_results: Option<i32>,
    next_token: Option<&str>,
) -> Result<(Vec<T>, Option<String>), ApiError> {
    let limit = max_results.map_or(MAX_RESULTS, |n| usize::try_from(n.max(1)).unwrap_or(1));
    let start = match next_token {
        Some(token) => {
            let after = decode_token(token)?;
            items.partition_point(|item| key(item) <= after.as_str())
        }
        None => 0,
    };
    let rest = &items[start..];
    let page: Vec<T> = rest.iter().take(limit).cloned().collect();
    let next = (rest.len() > limit)
        .then(|| page.last().map(|last| encode_token(key(last))))
        .flatten();
    Ok((page, next))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_round_trips() {
        assert_eq!(decode_token(&encode_token("web:3")).unwrap(), "web:3");
    }

    #[test]
    fn foreign_token_is_a_validation_error() {
        let err = decode_token("not-a-token!").unwrap_err();
        assert_eq!(err.error_type(), "ValidationException");
        assert!(decode_token(&URL_SAFE_NO_PAD.encode("other:1")).is_err());
    }

    #[test]
    fn pages_walk_the_whole_list_once() {
        let items: Vec<String> = (0..7).map(|i| format!("k{i}")).collect();
        let mut seen = Vec::new();
        let mut token = None;
        loop {
            let (page, next) = paginate(&items, |s| s.as_str(), Some(3), token.as_deref()).unwrap();
            seen.extend(page);
            match next {
                Some(t) => token = Some(t),
                None => break,
            }
        }
        assert_eq!(seen, items);
    }

    #[test]
    fn exact_final_page_has_no_token() {
        let items = vec!["a".to_string(), "b".to_string()];
        let (page, next) = paginate(&items, |s| s.as_str(), Some(2), None).unwrap();
        assert_eq!(page.len(), 2);
        assert_eq!(next, None);
    }
}
