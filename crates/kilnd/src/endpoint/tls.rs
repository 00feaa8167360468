//! The endpoint's TLS: a local CA and a wildcard server certificate it signs.
//!
//! On first start kilnd creates `<home>/tls/ca.pem` (CN "kiln local CA", 10 years) and a
//! certificate for `*.<domain>`, `<domain>`, `localhost` and 127.0.0.1 (1 year). Clients
//! trust `ca.pem`, so the CA outlives the server certificate: later starts reuse both and
//! re-issue only the server certificate when the domain changed, it expires within 30
//! days, or it no longer matches its key or the CA. Keys are written 0600.

use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, PublicKeyData, SanType, SerialNumber,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use time::{Duration, OffsetDateTime};
use x509_parser::extensions::GeneralName;
use x509_parser::prelude::{FromDer, X509Certificate};

use crate::endpoint::tokens::write_file_atomically;

/// The endpoint domain when none is configured: `<microvm-id>.kiln.localhost`.
pub const DEFAULT_DOMAIN: &str = "kiln.localhost";

/// Common name of the local CA.
const CA_NAME: &str = "kiln local CA";
/// The CA lives long because every client that trusts it would have to trust a new one.
const CA_LIFETIME: Duration = Duration::days(3650);
/// Lifetime of the server certificate.
const SERVER_LIFETIME: Duration = Duration::days(365);
/// Certificates this close to expiry are replaced at start.
const RENEW_BEFORE: Duration = Duration::days(30);
/// Certificates start this far in the past so a client whose clock is a little behind
/// still accepts a fresh one.
const BACKDATE: Duration = Duration::hours(1);
/// ALPN protocols the endpoint offers, preferred first.
const ALPN: [&[u8]; 2] = [b"h2", b"http/1.1"];

/// Why the endpoint's TLS material could not be loaded or created.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// The configured endpoint domain cannot be put in a certificate.
    #[error("the endpoint domain {domain:?} is not a valid DNS name: configure a name such as {DEFAULT_DOMAIN}")]
    InvalidDomain {
        /// The domain as configured.
        domain: String,
    },
    /// A file or directory under `<home>/tls` could not be read or written.
    #[error("{action} {path}: {source} (check that the kiln data directory is writable by kilnd)")]
    Io {
        /// What was being done.
        action: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// `ca.pem` and `ca.key` exist but cannot be used.
    #[error("the endpoint CA in {dir} cannot be used ({reason}): remove ca.pem and ca.key there to create a new CA, then have clients trust the new ca.pem")]
    CaUnusable {
        /// The TLS directory.
        dir: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// rcgen could not create a key or certificate.
    #[error("creating the endpoint's {what} failed: {source}")]
    Generate {
        /// Which key or certificate.
        what: &'static str,
        /// The underlying error.
        #[source]
        source: rcgen::Error,
    },
    /// rustls refused the certificate and key.
    #[error("configuring TLS with {path} failed: {source} (remove endpoint.pem and endpoint.key to have them re-issued)")]
    Config {
        /// The server certificate.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: rustls::Error,
    },
    /// The operating system's random source failed.
    #[error("reading random bytes from the operating system failed: {0}")]
    Random(getrandom::Error),
}

/// The endpoint's TLS material, ready for a listener.
#[derive(Debug, Clone)]
pub struct EndpointTls {
    /// The local CA certificate clients should trust (`<home>/tls/ca.pem`).
    pub ca_pem_path: PathBuf,
    /// Server config with the wildcard certificate; ALPN `h2`, then `http/1.1`.
    pub server_config: Arc<rustls::ServerConfig>,
}

/// Loads the endpoint's CA and certificate from `<home>/tls`, creating or re-issuing
/// them as needed (see [`EndpointTls::load_or_create`]).
pub fn load_or_create(home: &Path, domain: &str) -> Result<EndpointTls, TlsError> {
    EndpointTls::load_or_create(home, domain)
}

impl EndpointTls {
    /// Loads the endpoint's CA and certificate for `domain` from `<home>/tls`, creating
    /// them on first start and re-issuing the server certificate when it no longer fits.
    pub fn load_or_create(home: &Path, domain: &str) -> Result<EndpointTls, TlsError> {
        Self::load_or_create_at(home, domain, OffsetDateTime::now_utc())
    }

    /// A tokio acceptor for this configuration.
    pub fn acceptor(&self) -> tokio_rustls::TlsAcceptor {
        tokio_rustls::TlsAcceptor::from(self.server_config.clone())
    }

    fn load_or_create_at(
        home: &Path,
        domain: &str,
        now: OffsetDateTime,
    ) -> Result<EndpointTls, TlsError> {
        let domain = checked_domain(domain)?;
        let files = TlsFiles::new(home);
        std::fs::create_dir_all(&files.dir).map_err(|source| TlsError::Io {
            action: "creating",
            path: files.dir.clone(),
            source,
        })?;
        let ca = LocalCa::load_or_create(&files, now)?;
        let (cert_pem, key_pem) = match read_pair(&files.server_pem, &files.server_key)? {
            Some((cert, key)) => match server_cert_misfit(&cert, &key, &ca, &domain, now) {
                None => (cert, key),
                Some(reason) => {
                    tracing::info!(reason, "re-issuing the endpoint certificate");
                    issue_server_cert(&files, &ca, &domain, now)?
                }
            },
            None => issue_server_cert(&files, &ca, &domain, now)?,
        };
        let server_config = server_config(&files, &cert_pem, &key_pem)?;
        Ok(EndpointTls {
            ca_pem_path: files.ca_pem,
            server_config,
        })
    }
}

/// Paths under `<home>/tls`.
struct TlsFiles {
    dir: PathBuf,
    ca_pem: PathBuf,
    ca_key: PathBuf,
    server_pem: PathBuf,
    server_key: PathBuf,
}

impl TlsFiles {
    fn new(home: &Path) -> TlsFiles {
        let dir = home.join("tls");
        TlsFiles {
            ca_pem: dir.join("ca.pem"),
            ca_key: dir.join("ca.key"),
            server_pem: dir.join("endpoint.pem"),
            server_key: dir.join("endpoint.key"),
            dir,
        }
    }
}

/// The CA: what signing and checking the server certificate need.
struct LocalCa {
    issuer: Issuer<'static, KeyPair>,
    /// DER of the CA's SubjectPublicKeyInfo.
    spki: Vec<u8>,
}

impl LocalCa {
    fn load_or_create(files: &TlsFiles, now: OffsetDateTime) -> Result<LocalCa, TlsError> {
        match read_pair(&files.ca_pem, &files.ca_key)? {
            Some((cert, key)) => {
                let ca = Self::parse(files, &cert, &key)?;
                let not_after = not_after(&cert).unwrap_or(now);
                if not_after - now > RENEW_BEFORE {
                    return Ok(ca);
                }
                tracing::warn!(
                    ca = %files.ca_pem.display(),
                    "the endpoint CA expires within 30 days: creating a new one (clients must trust the new ca.pem)"
                );
            }
            None if files.ca_pem.exists() => tracing::warn!(
                ca = %files.ca_pem.display(),
                "the endpoint CA's key is missing: creating a new CA (clients must trust the new ca.pem)"
            ),
            None => {}
        }
        Self::create(files, now)
    }

    fn parse(files: &TlsFiles, cert_pem: &str, key_pem: &str) -> Result<LocalCa, TlsError> {
        let unusable = |reason: String| TlsError::CaUnusable {
            dir: files.dir.clone(),
            reason,
        };
        let key = KeyPair::from_pem(key_pem).map_err(|e| unusable(format!("ca.key: {e}")))?;
        let der = first_cert_der(cert_pem)
            .ok_or_else(|| unusable("ca.pem holds no certificate".into()))?;
        let (_, cert) =
            X509Certificate::from_der(&der).map_err(|e| unusable(format!("ca.pem: {e}")))?;
        let spki = cert.public_key().raw.to_vec();
        if spki != key.subject_public_key_info() {
            return Err(unusable("ca.key is not the key of ca.pem".into()));
        }
        let issuer =
            Issuer::from_ca_cert_der(&der, key).map_err(|e| unusable(format!("ca.pem: {e}")))?;
        Ok(LocalCa { issuer, spki })
    }

    fn create(files: &TlsFiles, now: OffsetDateTime) -> Result<LocalCa, TlsError> {
        let key = generate_key("CA key")?;
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params.distinguished_name.push(DnType::CommonName, CA_NAME);
        params
            .distinguished_name
            .push(DnType::OrganizationName, "kiln");
        // pathlen 0: the CA signs server certificates only, never another CA.
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        params.not_before = now - BACKDATE;
        params.not_after = now + CA_LIFETIME;
        params.serial_number = Some(random_serial()?);
        let cert = params
            .self_signed(&key)
            .map_err(|source| TlsError::Generate {
                what: "CA certificate",
                source,
            })?;
        // Key first: a crash between the two writes leaves a key without a certificate,
        // which the next start replaces; never a certificate without its key.
        write(&files.ca_key, &key.serialize_pem(), 0o600)?;
        write(&files.ca_pem, &cert.pem(), 0o644)?;
        Ok(LocalCa {
            spki: key.subject_public_key_info(),
            issuer: Issuer::new(params, key),
        })
    }
}

/// Creates and writes a server certificate for `domain` signed by `ca`; returns its PEM
/// and its key's PEM.
fn issue_server_cert(
    files: &TlsFiles,
    ca: &LocalCa,
    domain: &str,
    now: OffsetDateTime,
) -> Result<(String, String), TlsError> {
    let generate = |source| TlsError::Generate {
        what: "server certificate",
        source,
    };
    let key = generate_key("server key")?;
    let mut params = CertificateParams::new(server_names(domain)).map_err(generate)?;
    params
        .subject_alt_names
        .push(SanType::IpAddress(IpAddr::V4(Ipv4Addr::LOCALHOST)));
    params.distinguished_name = DistinguishedName::new();
    params.distinguished_name.push(DnType::CommonName, domain);
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    params.use_authority_key_identifier_extension = true;
    params.not_before = now - BACKDATE;
    params.not_after = now + SERVER_LIFETIME;
    params.serial_number = Some(random_serial()?);
    let cert = params.signed_by(&key, &ca.issuer).map_err(generate)?;
    let (cert_pem, key_pem) = (cert.pem(), key.serialize_pem());
    write(&files.server_key, &key_pem, 0o600)?;
    write(&files.server_pem, &cert_pem, 0o644)?;
    Ok((cert_pem, key_pem))
}

/// Why an existing server certificate must be re-issued, or `None` if it fits.
fn server_cert_misfit(
    cert_pem: &str,
    key_pem: &str,
    ca: &LocalCa,
    domain: &str,
    now: OffsetDateTime,
) -> Option<&'static str> {
    let Some(der) = first_cert_der(cert_pem) else {
        return Some("endpoint.pem holds no certificate");
    };
    let Ok((_, cert)) = X509Certificate::from_der(&der) else {
        return Some("endpoint.pem is not a certificate");
    };
    let Ok(key) = KeyPair::from_pem(key_pem) else {
        return Some("endpoint.key is not a key");
    };
    if cert.public_key().raw != key.subject_public_key_info().as_slice() {
        return Some("endpoint.key is not the key of endpoint.pem");
    }
    let Ok((_, ca_spki)) = x509_parser::x509::SubjectPublicKeyInfo::from_der(&ca.spki) else {
        return Some("the CA key cannot be read back");
    };
    if cert.verify_signature(Some(&ca_spki)).is_err() {
        return Some("it was signed by another CA");
    }
    let expires = OffsetDateTime::from_unix_timestamp(cert.validity().not_after.timestamp());
    if expires.map_or(true, |t| t - now <= RENEW_BEFORE) {
        return Some("it expires within 30 days");
    }
    if cert_names(&cert) != expected_names(domain) {
        return Some("the endpoint domain changed");
    }
    None
}

/// The DNS names the server certificate carries for `domain`.
fn server_names(domain: &str) -> Vec<String> {
    vec![
        format!("*.{domain}"),
        domain.to_string(),
        "localhost".to_string(),
    ]
}

/// The names (DNS and IP, as text) a certificate for `domain` carries, sorted.
fn expected_names(domain: &str) -> Vec<String> {
    let mut names = server_names(domain);
    names.push(Ipv4Addr::LOCALHOST.to_string());
    names.sort();
    names
}

/// The subject alternative names of `cert` as text, sorted.
fn cert_names(cert: &X509Certificate<'_>) -> Vec<String> {
    let mut names: Vec<String> = match cert.subject_alternative_name() {
        Ok(Some(san)) => san
            .value
            .general_names
            .iter()
            .map(|name| match name {
                GeneralName::DNSName(dns) => dns.to_string(),
                GeneralName::IPAddress(bytes) => match <[u8; 4]>::try_from(*bytes) {
                    Ok(v4) => Ipv4Addr::from(v4).to_string(),
                    Err(_) => format!("{bytes:?}"),
                },
                other => format!("{other:?}"),
            })
            .collect(),
        _ => Vec::new(),
    };
    names.sort();
    names
}

/// Lower-cases `domain` and checks that it and `*.domain` are valid DNS names.
fn checked_domain(domain: &str) -> Result<String, TlsError> {
    let lower = domain.trim_end_matches('.').to_ascii_lowercase();
    let invalid = || TlsError::InvalidDomain {
        domain: domain.to_string(),
    };
    if lower.is_empty() || lower.parse::<IpAddr>().is_ok() {
        return Err(invalid());
    }
    rustls::pki_types::DnsName::try_from(lower.as_str()).map_err(|_| invalid())?;
    rustls::pki_types::DnsName::try_from(format!("x.{lower}")).map_err(|_| invalid())?;
    Ok(lower)
}

/// Builds the server config from PEM: the server certificate (the CA is the clients'
/// trust anchor, so it is not sent) and its key; ALPN h2 then http/1.1.
fn server_config(
    files: &TlsFiles,
    cert_pem: &str,
    key_pem: &str,
) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let config_err = |source| TlsError::Config {
        path: files.server_pem.clone(),
        source,
    };
    let pem_err = |e: rustls::pki_types::pem::Error| {
        config_err(rustls::Error::General(format!("reading PEM: {e}")))
    };
    let chain = CertificateDer::pem_slice_iter(cert_pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(pem_err)?;
    let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).map_err(pem_err)?;
    // An explicit provider, so the process-wide default (unset, or ambiguous when another
    // crate enables a second provider) never matters.
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(config_err)?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .map_err(config_err)?;
    config.alpn_protocols = ALPN.iter().map(|p| p.to_vec()).collect();
    Ok(Arc::new(config))
}

/// Reads a certificate and its key; `None` when either file is missing.
fn read_pair(cert: &Path, key: &Path) -> Result<Option<(String, String)>, TlsError> {
    match (read_optional(cert)?, read_optional(key)?) {
        (Some(cert), Some(key)) => Ok(Some((cert, key))),
        _ => Ok(None),
    }
}

fn read_optional(path: &Path) -> Result<Option<String>, TlsError> {
    match std::fs::read_to_string(path) {
        Ok(text) => Ok(Some(text)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(TlsError::Io {
            action: "reading",
            path: path.to_path_buf(),
            source,
        }),
    }
}

fn write(path: &Path, text: &str, mode: u32) -> Result<(), TlsError> {
    write_file_atomically(path, text.as_bytes(), mode).map_err(|source| TlsError::Io {
        action: "writing",
        path: path.to_path_buf(),
        source,
    })
}

fn first_cert_der(pem: &str) -> Option<CertificateDer<'static>> {
    CertificateDer::pem_slice_iter(pem.as_bytes()).next()?.ok()
}

fn not_after(cert_pem: &str) -> Option<OffsetDateTime> {
    let der = first_cert_der(cert_pem)?;
    let (_, cert) = X509Certificate::from_der(&der).ok()?;
    OffsetDateTime::from_unix_timestamp(cert.validity().not_after.timestamp()).ok()
}

fn generate_key(what: &'static str) -> Result<KeyPair, TlsError> {
    KeyPair::generate().map_err(|source| TlsError::Generate { what, source })
}

/// A random positive 128-bit serial number.
fn random_serial() -> Result<SerialNumber, TlsError> {
    let mut bytes = [0u8; 16];
    getrandom::fill(&mut bytes).map_err(TlsError::Random)?;
    bytes[0] &= 0x7f;
    Ok(SerialNumber::from(bytes.to_vec()))
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use rustls::pki_types::ServerName;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    fn mode(path: &Path) -> u32 {
        std::fs::metadata(path)
            .expect("metadata")
            .permissions()
            .mode()
            & 0o777
    }

    fn client_trusting(ca_pem: &Path, alpn: &[&[u8]]) -> tokio_rustls::TlsConnector {
        let mut roots = rustls::RootCertStore::empty();
        for cert in CertificateDer::pem_file_iter(ca_pem).expect("ca.pem") {
            roots.add(cert.expect("certificate")).expect("trust anchor");
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("versions")
            .with_root_certificates(roots)
            .with_no_client_auth();
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        tokio_rustls::TlsConnector::from(Arc::new(config))
    }

    /// Handshakes over an in-memory pipe, exchanges one message, returns the ALPN protocol
    /// the client ended up with.
    async fn handshake(
        tls: &EndpointTls,
        server_name: &str,
        alpn: &[&[u8]],
    ) -> Result<Option<Vec<u8>>, std::io::Error> {
        let (client_io, server_io) = tokio::io::duplex(64 * 1024);
        let acceptor = tls.acceptor();
        let server = tokio::spawn(async move {
            let mut stream = acceptor.accept(server_io).await?;
            stream.write_all(b"hello").await?;
            stream.shutdown().await
        });
        let name = ServerName::try_from(server_name.to_string()).expect("server name");
        let mut stream = client_trusting(&tls.ca_pem_path, alpn)
            .connect(name, client_io)
            .await?;
        let mut greeting = Vec::new();
        stream.read_to_end(&mut greeting).await?;
        server.await.expect("server task")?;
        assert_eq!(greeting, b"hello");
        Ok(stream.get_ref().1.alpn_protocol().map(<[u8]>::to_vec))
    }

    #[test]
    fn load_or_create_when_first_started_then_files_exist_with_private_keys() {
        let home = tempfile::tempdir().expect("temp dir");

        let tls = EndpointTls::load_or_create(home.path(), DEFAULT_DOMAIN).expect("tls");

        let dir = home.path().join("tls");
        assert_eq!(tls.ca_pem_path, dir.join("ca.pem"));
        assert_eq!(mode(&dir.join("ca.key")), 0o600);
        assert_eq!(mode(&dir.join("endpoint.key")), 0o600);
        assert_eq!(mode(&dir.join("ca.pem")), 0o644);
        assert_eq!(mode(&dir.join("endpoint.pem")), 0o644);
    }

    #[test]
    fn load_or_create_when_started_again_then_reuses_ca_and_certificate() {
        let home = tempfile::tempdir().expect("temp dir");
        let dir = home.path().join("tls");
        load_or_create(home.path(), DEFAULT_DOMAIN).expect("first start");
        let read = |name: &str| std::fs::read(dir.join(name)).expect("read");
        let before = ["ca.pem", "ca.key", "endpoint.pem", "endpoint.key"].map(read);

        load_or_create(home.path(), DEFAULT_DOMAIN).expect("second start");

        let after = ["ca.pem", "ca.key", "endpoint.pem", "endpoint.key"].map(read);
        assert_eq!(before, after);
    }

    #[test]
    fn load_or_create_when_domain_changed_then_reissues_certificate_under_the_same_ca() {
        let home = tempfile::tempdir().expect("temp dir");
        let dir = home.path().join("tls");
        load_or_create(home.path(), DEFAULT_DOMAIN).expect("first start");
        let ca_before = std::fs::read(dir.join("ca.pem")).expect("ca");
        let cert_before = std::fs::read(dir.join("endpoint.pem")).expect("cert");

        load_or_create(home.path(), "vms.example.test").expect("second start");

        assert_eq!(std::fs::read(dir.join("ca.pem")).expect("ca"), ca_before);
        assert_ne!(
            std::fs::read(dir.join("endpoint.pem")).expect("cert"),
            cert_before
        );
    }

    #[test]
    fn load_or_create_when_certificate_expires_within_30_days_then_reissues_it() {
        let home = tempfile::tempdir().expect("temp dir");
        let dir = home.path().join("tls");
        let now = OffsetDateTime::now_utc();
        EndpointTls::load_or_create_at(home.path(), DEFAULT_DOMAIN, now).expect("first");
        let cert_before = std::fs::read(dir.join("endpoint.pem")).expect("cert");

        let later = now + Duration::days(340);
        EndpointTls::load_or_create_at(home.path(), DEFAULT_DOMAIN, later).expect("later");

        let cert_after = std::fs::read_to_string(dir.join("endpoint.pem")).expect("cert");
        assert_ne!(cert_after.as_bytes(), cert_before);
        let expires = not_after(&cert_after).expect("expiry");
        assert!(expires > later + Duration::days(300), "{expires}");
    }

    #[test]
    fn load_or_create_when_domain_is_not_a_dns_name_then_invalid_domain() {
        let home = tempfile::tempdir().expect("temp dir");

        let results = ["", "bad domain", "127.0.0.1"].map(|d| load_or_create(home.path(), d));

        for result in results {
            assert!(
                matches!(result, Err(TlsError::InvalidDomain { .. })),
                "{result:?}"
            );
        }
    }

    #[test]
    fn load_or_create_when_ca_key_is_damaged_then_says_how_to_recover() {
        let home = tempfile::tempdir().expect("temp dir");
        load_or_create(home.path(), DEFAULT_DOMAIN).expect("first start");
        std::fs::write(home.path().join("tls/ca.key"), "garbage").expect("write");

        let err = load_or_create(home.path(), DEFAULT_DOMAIN).expect_err("damaged CA");

        assert!(matches!(err, TlsError::CaUnusable { .. }), "{err:?}");
        assert!(
            err.to_string().contains("remove ca.pem and ca.key"),
            "{err}"
        );
    }

    #[tokio::test]
    async fn handshake_when_client_trusts_ca_and_offers_h2_then_negotiates_h2() {
        let home = tempfile::tempdir().expect("temp dir");
        let tls = load_or_create(home.path(), DEFAULT_DOMAIN).expect("tls");

        let alpn = handshake(&tls, "abc.kiln.localhost", &[b"h2", b"http/1.1"]).await;

        assert_eq!(alpn.expect("handshake"), Some(b"h2".to_vec()));
    }

    #[tokio::test]
    async fn handshake_when_client_offers_only_http1_then_negotiates_http1() {
        let home = tempfile::tempdir().expect("temp dir");
        let tls = load_or_create(home.path(), DEFAULT_DOMAIN).expect("tls");

        let alpn = handshake(&tls, "abc.kiln.localhost", &[b"http/1.1"]).await;

        assert_eq!(alpn.expect("handshake"), Some(b"http/1.1".to_vec()));
    }

    #[tokio::test]
    async fn handshake_when_addressing_localhost_or_the_bare_domain_then_succeeds() {
        let home = tempfile::tempdir().expect("temp dir");
        let tls = load_or_create(home.path(), DEFAULT_DOMAIN).expect("tls");

        for name in ["localhost", "kiln.localhost", "127.0.0.1"] {
            let result = handshake(&tls, name, &[b"h2"]).await;
            assert!(result.is_ok(), "{name}: {result:?}");
        }
    }

    #[tokio::test]
    async fn handshake_when_name_is_outside_the_domain_then_client_rejects_certificate() {
        let home = tempfile::tempdir().expect("temp dir");
        let tls = load_or_create(home.path(), DEFAULT_DOMAIN).expect("tls");

        let result = handshake(&tls, "abc.example.com", &[b"h2"]).await;

        let err = result.expect_err("certificate does not cover example.com");
        assert!(err.to_string().contains("certificate"), "{err}");
    }
}
