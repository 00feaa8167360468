//! Percent-coding of URI labels and query strings, as botocore writes them.

/// Decodes `%XX` escapes; `None` on a malformed escape or invalid UTF-8. A `+` stays a
/// `+`: botocore encodes spaces as `%20`, and `+` is a legal tag character.
pub fn percent_decode(s: &str) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = s.get(i + 1..i + 3)?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// Encodes everything but RFC 3986 unreserved characters, so `:` and `/` in an ARN
/// label are escaped as botocore does.
pub fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Splits a raw query string (without `?`) into decoded pairs, in order. Pairs that do
/// not decode are dropped; a key without `=` has an empty value.
pub fn parse_query(raw: &str) -> Vec<(String, String)> {
    raw.split('&')
        .filter(|part| !part.is_empty())
        .filter_map(|part| {
            let (k, v) = part.split_once('=').unwrap_or((part, ""));
            Some((percent_decode(k)?, percent_decode(v)?))
        })
        .collect()
}

/// Joins pairs into a query string (without `?`), encoding keys and values.
pub fn format_query(pairs: &[(String, String)]) -> String {
    pairs
        .iter()
        .map(|(k, v)| format!("{}={}", percent_encode(k), percent_encode(v)))
        .collect::<Vec<_>>()
        .join("&")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arn_round_trips_through_encoding() {
        let arn = "arn:aws:lambda:local:000000000000:microvm-image:web";
        let encoded = percent_encode(arn);
        assert_eq!(
            encoded,
            "arn%3Aaws%3Alambda%3Alocal%3A000000000000%3Amicrovm-image%3Aweb"
        );
        assert_eq!(percent_decode(&encoded).as_deref(), Some(arn));
    }

    #[test]
    fn malformed_escape_is_rejected() {
        assert_eq!(percent_decode("abc%2"), None);
        assert_eq!(percent_decode("%zz"), None);
    }

    #[test]
    fn query_keeps_repeated_keys_in_order() {
        let pairs = parse_query("tagKeys=a%20b&tagKeys=c+d&flag");
        assert_eq!(
            pairs,
            vec![
                ("tagKeys".to_string(), "a b".to_string()),
                ("tagKeys".to_string(), "c+d".to_string()),
                ("flag".to_string(), String::new()),
            ]
        );
    }
}
