//! Image references as Docker reads them (`python:3.12-slim` is
//! `docker.io/library/python:3.12-slim`), mirrors, and which registries speak plain HTTP.

use std::str::FromStr;

use oci_client::Reference;

/// Parses `FROM`'s word into a full reference (Docker Hub's implicit names applied, `latest`
/// when neither tag nor digest is given).
pub fn parse(word: &str) -> Result<Reference, String> {
    let r = Reference::from_str(word).map_err(|e| {
        format!("{word} is not an image reference ({e}); write e.g. python:3.12-slim, ghcr.io/org/app:1 or name@sha256:<64 hex>")
    })?;
    if let Some(d) = r.digest() {
        let hex = d.strip_prefix("sha256:").unwrap_or_default();
        if hex.len() != 64 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(format!(
                "{word}: digest {d} is not sha256:<64 hex digits> (the only digest kiln verifies)"
            ));
        }
    }
    Ok(r)
}

/// `REGISTRY=URL`: pull `REGISTRY`'s images through the mirror at `URL` (`http://` means
/// plain HTTP), e.g. `docker.io=http://127.0.0.1:5000`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mirror {
    /// The registry mirrored, as references name it (`docker.io`, `ghcr.io`, `host:port`).
    pub registry: String,
    /// The mirror's `host[:port]`.
    pub host: String,
    /// Whether it speaks plain HTTP.
    pub plain_http: bool,
}

impl FromStr for Mirror {
    type Err = String;

    fn from_str(s: &str) -> Result<Mirror, String> {
        let (registry, url) = s.split_once('=').ok_or_else(|| {
            format!(
                "registry mirror {s:?}: write REGISTRY=URL, e.g. docker.io=http://127.0.0.1:5000"
            )
        })?;
        let registry = match registry.trim() {
            "index.docker.io" | "registry-1.docker.io" => "docker.io",
            r => r,
        };
        let (plain_http, rest) = if let Some(rest) = url.strip_prefix("http://") {
            (true, rest)
        } else if let Some(rest) = url.strip_prefix("https://") {
            (false, rest)
        } else {
            (false, url)
        };
        let host = rest.trim_end_matches('/');
        if registry.is_empty()
            || host.is_empty()
            || host.contains('/')
            || host.contains(char::is_whitespace)
        {
            return Err(format!(
                "registry mirror {s:?}: write REGISTRY=URL with URL http(s)://host[:port] (no path)"
            ));
        }
        Ok(Mirror {
            registry: registry.to_string(),
            host: host.to_string(),
            plain_http,
        })
    }
}

/// Whether `host[:port]` is on loopback, where Docker too speaks plain HTTP by default.
pub fn is_loopback(host: &str) -> bool {
    let name = match host.strip_prefix('[') {
        Some(v6) => v6.split(']').next().unwrap_or_default(),
        None => host.rsplit_once(':').map_or(host, |(h, _)| h),
    };
    name == "localhost"
        || name
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_when_docker_hub_short_name_then_library_and_latest_implied() {
        let r = parse("python").expect("parse");
        let tagged = parse("python:3.12-slim").expect("parse");
        let user = parse("someone/app:1").expect("parse");

        assert_eq!(
            (r.registry(), r.repository(), r.tag()),
            ("docker.io", "library/python", Some("latest"))
        );
        assert_eq!(tagged.tag(), Some("3.12-slim"));
        assert_eq!(user.repository(), "someone/app");
        assert_eq!(r.resolve_registry(), "index.docker.io");
    }

    #[test]
    fn parse_when_registry_host_and_digest_then_kept() {
        let d = format!("sha256:{}", "a".repeat(64));

        let r = parse(&format!("127.0.0.1:5000/team/app:1@{d}")).expect("parse");

        assert_eq!(r.registry(), "127.0.0.1:5000");
        assert_eq!(r.repository(), "team/app");
        assert_eq!(r.digest(), Some(d.as_str()));
    }

    #[test]
    fn parse_when_bad_digest_or_word_then_says_what_to_write() {
        let bad = parse("app@sha256:abc").expect_err("short digest");
        let worse = parse("UPPER/Case").expect_err("bad name");

        assert!(
            bad.contains("sha256:<64 hex digits>") || bad.contains("not an image reference"),
            "{bad}"
        );
        assert!(worse.contains("python:3.12-slim"), "{worse}");
    }

    #[test]
    fn mirror_when_http_then_plain_and_hub_aliases_folded() {
        let m: Mirror = "index.docker.io=http://127.0.0.1:5000/"
            .parse()
            .expect("mirror");
        let tls: Mirror = "ghcr.io=https://mirror.example:8443"
            .parse()
            .expect("mirror");

        assert_eq!(
            m,
            Mirror {
                registry: "docker.io".into(),
                host: "127.0.0.1:5000".into(),
                plain_http: true
            }
        );
        assert!(!tls.plain_http);
        assert!("docker.io".parse::<Mirror>().is_err());
        assert!("docker.io=http://h/path".parse::<Mirror>().is_err());
    }

    #[test]
    fn is_loopback_when_localhost_or_127_then_true() {
        assert!(
            is_loopback("localhost:5000") && is_loopback("127.0.0.1:1") && is_loopback("[::1]:5")
        );
        assert!(!is_loopback("ghcr.io") && !is_loopback("10.0.0.1:5000"));
    }
}
