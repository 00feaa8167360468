//! Code artifacts from an external S3-compatible store (`kilnd --artifact-s3-endpoint`),
//! instead of the embedded one: `s3://bucket/key` is fetched path-style from the endpoint
//! with a SigV4-signed GET, streamed into the build's work directory with a size cap.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use anyhow::Context;
use futures_util::StreamExt;
use kiln_sigv4::{CredentialSources, RequestSigner};
use tokio::io::AsyncWriteExt;

/// An external S3-compatible store.
pub struct RemoteS3 {
    base: reqwest::Url,
    signer: RequestSigner,
    http: reqwest::Client,
}

impl RemoteS3 {
    /// A store at `endpoint` (e.g. `https://s3.example.com:9000`), signing in `region` with
    /// the `[default]` profile of `credentials_file`, or with `AWS_ACCESS_KEY_ID` and
    /// `AWS_SECRET_ACCESS_KEY` when no file is given.
    pub fn new(
        endpoint: &str,
        credentials_file: Option<&Path>,
        region: &str,
    ) -> anyhow::Result<RemoteS3> {
        let base = reqwest::Url::parse(endpoint).with_context(|| {
            format!(
                "--artifact-s3-endpoint {endpoint} is not a URL: use e.g. https://s3.example.com"
            )
        })?;
        let sources = match credentials_file {
            Some(f) => CredentialSources {
                files: vec![f.to_owned()],
                ..Default::default()
            },
            None => {
                let var = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
                CredentialSources {
                    env_access_key_id: var("AWS_ACCESS_KEY_ID"),
                    env_secret_access_key: var("AWS_SECRET_ACCESS_KEY"),
                    env_session_token: var("AWS_SESSION_TOKEN"),
                    ..Default::default()
                }
            }
        };
        let credentials = sources.resolve().context(
            "credentials for --artifact-s3-endpoint: pass --artifact-s3-credentials FILE \
             (AWS shared-credentials format) or set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY",
        )?;
        let _ = rustls::crypto::ring::default_provider().install_default();
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(10))
            .build()
            .context("creating the HTTP client for the artifact store")?;
        Ok(RemoteS3 {
            base,
            signer: RequestSigner::s3(credentials, region),
            http,
        })
    }

    /// The endpoint, for messages.
    pub fn endpoint(&self) -> &str {
        self.base.as_str()
    }

    /// The path-style URL of `s3://bucket/key`.
    fn url(&self, uri: &str) -> Result<reqwest::Url, String> {
        let rest = uri
            .strip_prefix("s3://")
            .ok_or_else(|| format!("{uri} is not an s3:// URI"))?;
        let (bucket, key) = rest
            .split_once('/')
            .filter(|(b, k)| !b.is_empty() && !k.is_empty())
            .ok_or_else(|| format!("codeArtifact.uri {uri} is not of the form s3://bucket/key"))?;
        let mut url = self.base.clone();
        url.path_segments_mut()
            .map_err(|()| format!("{} cannot take a path", self.base))?
            .pop_if_empty()
            .push(bucket)
            .extend(key.split('/'));
        Ok(url)
    }

    /// Downloads `uri` to `dest` (at most `max_bytes`); the file is complete or absent.
    pub async fn fetch(&self, uri: &str, dest: &Path, max_bytes: u64) -> Result<PathBuf, String> {
        let url = self.url(uri)?;
        let mut req = self
            .http
            .get(url.clone())
            .build()
            .map_err(|e| format!("fetching {uri}: {e}"))?;
        self.signer
            .sign(&mut req, SystemTime::now())
            .map_err(|e| format!("signing the request for {uri}: {e:#}"))?;
        let resp = self
            .http
            .execute(req)
            .await
            .map_err(|e| format!("fetching {uri} from {}: {e}", self.base))?;
        if !resp.status().is_success() {
            let status = resp.status();
            let text = resp.text().await.unwrap_or_default();
            let code = text
                .split("<Code>")
                .nth(1)
                .and_then(|t| t.split("</Code>").next())
                .unwrap_or("");
            return Err(format!(
                "fetching {uri} from {}: {status} {code}; check the bucket, key and the \
                 credentials kilnd signs with (--artifact-s3-credentials)",
                self.base
            ));
        }
        let partial = dest.with_extension("partial");
        let written = async {
            let mut file = tokio::fs::File::create(&partial)
                .await
                .map_err(|e| format!("creating {}: {e}", partial.display()))?;
            let mut total = 0u64;
            let mut body = resp.bytes_stream();
            while let Some(chunk) = body.next().await {
                let chunk =
                    chunk.map_err(|e| format!("fetching {uri}: the download broke off: {e}"))?;
                total += chunk.len() as u64;
                if total > max_bytes {
                    return Err(format!(
                        "{uri} is larger than {} MiB, the most kiln accepts as a code artifact",
                        max_bytes >> 20
                    ));
                }
                file.write_all(&chunk)
                    .await
                    .map_err(|e| format!("writing {}: {e}", partial.display()))?;
            }
            file.sync_all()
                .await
                .map_err(|e| format!("writing {}: {e}", partial.display()))
        }
        .await;
        match written {
            Ok(()) => {
                std::fs::rename(&partial, dest)
                    .map_err(|e| format!("writing {}: {e}", dest.display()))?;
                Ok(dest.to_owned())
            }
            Err(e) => {
                let _ = std::fs::remove_file(&partial);
                Err(e)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn url_when_bucket_and_key_then_path_style_with_each_segment_encoded() {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let store = RemoteS3 {
            base: reqwest::Url::parse("http://127.0.0.1:9000/").expect("url"),
            signer: RequestSigner::s3(
                kiln_sigv4::Credentials {
                    access_key_id: "AKID".into(),
                    secret_access_key: "s".into(),
                    session_token: None,
                    source: "test".into(),
                },
                "us-east-1",
            ),
            http: reqwest::Client::new(),
        };

        assert_eq!(
            store.url("s3://apps/v1/my app.zip").expect("url").as_str(),
            "http://127.0.0.1:9000/apps/v1/my%20app.zip"
        );
        assert!(store.url("s3://apps").is_err());
        assert!(store.url("https://x/y").is_err());
    }
}
