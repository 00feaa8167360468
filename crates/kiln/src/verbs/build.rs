//! `kiln build DIR`: zip a build context, create or update the image, follow the build.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::Args;
use futures_util::StreamExt;
use kiln_api::shapes::{
    CodeArtifact, CreateMicrovmImageRequest, CreateMicrovmImageResponse, ImageVersionConfig,
    MicrovmImageVersionState, MicrovmImageVersionSummary, Resources, UpdateMicrovmImageRequest,
    UpdateMicrovmImageResponse,
};
use kiln_api::{ArnContext, Operation};
use reqwest::Method;

use crate::client::{ApiFailure, Call, Kilnd};
use crate::progress::BuildProgress;
use crate::render::key_values;
use crate::{input, logs, Global, Output};

/// `kiln build` flags.
#[derive(Args, Debug)]
#[command(
    after_help = "Examples:\n  kiln build ./app --name web\n  kiln build ./api --base debian --memory 512 -e PORT=8080"
)]
pub struct BuildArgs {
    /// The build context: a directory with a Dockerfile (`.dockerignore` is honoured).
    pub dir: PathBuf,
    /// The image's name [default: the directory's name].
    #[arg(long)]
    pub name: Option<String>,
    /// Managed base: busybox, debian, or an image ARN [default: the one the Dockerfile's FROM names, else busybox].
    #[arg(long, value_name = "BASE")]
    pub base: Option<String>,
    /// IAM role ARN the build runs as.
    #[arg(
        long,
        default_value = "arn:aws:iam::000000000000:role/kiln-build",
        value_name = "ARN"
    )]
    pub build_role_arn: String,
    /// Memory the app needs, MiB: 512, 1024, 2048, 4096 or 8192.
    #[arg(long, default_value_t = 512, value_name = "MIB")]
    pub memory: i32,
    /// Environment of the app, KEY=VALUE (repeatable).
    #[arg(long = "env", short = 'e', value_name = "KEY=VALUE")]
    pub env: Vec<String>,
    /// Free text describing this version.
    #[arg(long)]
    pub description: Option<String>,
    /// Where the zip is written before it is uploaded to your bucket in kilnd's S3 store [default: <home>/artifacts].
    #[arg(long, env = "KILN_ARTIFACT_DIR", value_name = "DIR")]
    pub artifact_dir: Option<PathBuf>,
    /// Start the build and return without following it.
    #[arg(long)]
    pub no_wait: bool,
    /// A secret for `RUN --mount=type=secret,id=NAME` steps, read from a file or an
    /// environment variable (repeatable). Held by kilnd in memory for this build only.
    #[arg(long = "secret", value_name = "id=NAME,src=FILE|env=VAR")]
    pub secrets: Vec<String>,
}

/// One `--secret id=NAME,src=FILE` / `id=NAME,env=VAR` (Docker's syntax; `source=` too):
/// the id and the value.
fn read_secret(spec: &str) -> anyhow::Result<(String, Vec<u8>)> {
    let mut id = None;
    let mut src = None;
    let mut env = None;
    for field in spec.split(',') {
        match field.split_once('=') {
            Some(("id", v)) => id = Some(v.to_string()),
            Some(("src" | "source", v)) => src = Some(PathBuf::from(v)),
            Some(("env", v)) => env = Some(v.to_string()),
            Some(("type", "file" | "env")) => {}
            _ => bail!(
                "--secret {spec}: unknown field {field:?} (give id=NAME,src=FILE or id=NAME,env=VAR)"
            ),
        }
    }
    let id = id
        .filter(|i| !i.is_empty())
        .with_context(|| format!("--secret {spec}: give id=NAME"))?;
    let value = match (src, env) {
        (Some(path), None) => std::fs::read(&path)
            .with_context(|| format!("--secret id={id}: cannot read {}", path.display()))?,
        (None, Some(var)) => std::env::var_os(&var)
            .with_context(|| format!("--secret id={id}: environment variable {var} is not set"))?
            .into_encoded_bytes(),
        _ => bail!("--secret id={id}: give exactly one of src=FILE or env=VAR"),
    };
    Ok((id, value))
}

/// The managed bases: what `--base` and a Dockerfile's `FROM` call them, and their ARN name.
const BASES: &[(&[&str], &str)] = &[
    (&["busybox", "kiln/busybox"], "busybox"),
    (
        &["debian", "debian-12", "debian:12", "kiln/debian"],
        "debian-12",
    ),
];

/// The image name a directory gives: its name with characters names cannot hold as `-`.
fn name_from_dir(dir: &Path) -> anyhow::Result<String> {
    let raw = dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let name: String = raw
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '-'
            }
        })
        .take(64)
        .collect();
    if name.trim_matches('-').is_empty() {
        bail!("cannot name the image after {}: pass --name", dir.display());
    }
    Ok(name)
}

/// The base ARN: `--base`, else the Dockerfile's `FROM`, else busybox.
fn base_arn(base: Option<&str>, dockerfile: &str) -> anyhow::Result<String> {
    let arn = |name: &str| ArnContext::default().managed_image_arn(name);
    if let Some(b) = base {
        if b.starts_with("arn:") {
            return Ok(b.to_string());
        }
        return BASES
            .iter()
            .find(|(names, _)| names.contains(&b))
            .map(|(_, name)| arn(name))
            .with_context(|| {
                format!("unknown base {b}: use busybox, debian, or a managed image ARN (`kiln list-managed-microvm-images`)")
            });
    }
    // The image's own base: the last stage's FROM, through the stages it builds on (what
    // kilnd checks `baseImageArn` against).
    let from = kiln_image::build::image_base(dockerfile).unwrap_or_default();
    let from = from.as_str();
    let name = BASES
        .iter()
        .find(|(names, _)| {
            names
                .iter()
                .filter(|n| n.starts_with("kiln/"))
                .any(|n| from == *n || from.starts_with(&format!("{n}:")))
        })
        .map(|(_, name)| *name)
        // A registry image (`FROM python:3.12-slim`) runs on kiln's default VM base, as AWS's
        // templates name it; an unknown `kiln/…` or no FROM stays on busybox.
        .unwrap_or(
            if from.is_empty() || from == "scratch" || from.starts_with("kiln/") {
                "busybox"
            } else {
                "al2023-1"
            },
        );
    Ok(arn(name))
}

/// Zips `dir` into `artifacts` under a name that is the content's digest, so the same
/// context is stored once; the zip's path.
fn write_artifact(
    dir: &Path,
    artifacts: &Path,
    name: &str,
) -> anyhow::Result<(PathBuf, kiln_image::context::ZipStats)> {
    std::fs::create_dir_all(artifacts).with_context(|| {
        format!(
            "cannot create the artifact directory {} (pick another with --artifact-dir)",
            artifacts.display()
        )
    })?;
    let partial = artifacts.join(format!(".{name}-{}.zip.partial", std::process::id()));
    let stats = kiln_image::context::zip_dir(dir, &partial)
        .with_context(|| format!("cannot zip the build context {}", dir.display()))?;
    let digest = {
        let bytes = std::fs::read(&partial)
            .with_context(|| format!("reading back {}", partial.display()))?;
        blake3::hash(&bytes).to_hex()
    };
    let path = artifacts.join(format!("{name}-{}.zip", &digest[..16]));
    std::fs::rename(&partial, &path)
        .with_context(|| format!("cannot move the zip into place at {}", path.display()))?;
    // kilnd may run as another user; the context is for it to read.
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644))
        .with_context(|| format!("cannot make {} readable for kilnd", path.display()))?;
    Ok((path, stats))
}

/// The bucket of kilnd's S3 store that `kiln build` keeps `principal`'s zips in:
/// `kiln-artifacts-<principal>` when that is a valid bucket name, else the name's digest.
pub fn artifact_bucket(principal: &str) -> String {
    let readable = (1..=40).contains(&principal.len())
        && principal
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !principal.ends_with('-');
    if readable {
        format!("kiln-artifacts-{principal}")
    } else {
        let digest = blake3::hash(principal.as_bytes()).to_hex();
        format!("kiln-artifacts-{}", &digest[..16])
    }
}

/// Uploads `zip` to the signer's own bucket in kilnd's S3 store (made on first use) under
/// `<image>/`; the `s3://` URI of the object.
async fn upload(kilnd: &Kilnd, zip: &Path, image: &str) -> anyhow::Result<String> {
    let who = kilnd
        .kiln_json(Method::GET, "/kiln/v1/whoami", None)
        .await
        .context("asking kilnd which principal signs (GET /kiln/v1/whoami)")?;
    let principal = who["principal"]
        .as_str()
        .context("kilnd's answer to GET /kiln/v1/whoami names no principal")?;
    let bucket = artifact_bucket(principal);
    let head = kilnd.s3(Method::HEAD, &format!("/{bucket}"), None).await?;
    match head.status().as_u16() {
        200 => {}
        404 => {
            let made = kilnd.s3(Method::PUT, &format!("/{bucket}"), None).await?;
            // 409: made meanwhile by another `kiln build` of ours; the upload tells.
            if !made.status().is_success() && made.status().as_u16() != 409 {
                let status = made.status();
                let text = made.text().await.unwrap_or_default();
                bail!("cannot create bucket {bucket} in kilnd's S3 store: {status} {text}");
            }
        }
        403 => bail!(
            "bucket {bucket} in kilnd's S3 store belongs to another principal than {principal}; \
             ask the admin to remove it (`aws s3 rb s3://{bucket} --force`)"
        ),
        status => bail!("checking bucket {bucket} in kilnd's S3 store: HTTP {status}"),
    }
    let file = zip
        .file_name()
        .map(|f| f.to_string_lossy().into_owned())
        .unwrap_or_else(|| "app.zip".into());
    let key = format!("{image}/{file}");
    let bytes = std::fs::read(zip).with_context(|| format!("reading {}", zip.display()))?;
    let put = kilnd
        .s3(Method::PUT, &format!("/{bucket}/{key}"), Some(bytes))
        .await?;
    if !put.status().is_success() {
        let status = put.status();
        let text = put.text().await.unwrap_or_default();
        bail!(
            "uploading {} to s3://{bucket}/{key}: {status} {text}",
            zip.display()
        );
    }
    Ok(format!("s3://{bucket}/{key}"))
}

fn env_map(pairs: &[String]) -> anyhow::Result<Option<kiln_api::shapes::EnvironmentVariables>> {
    if pairs.is_empty() {
        return Ok(None);
    }
    let mut map = kiln_api::shapes::EnvironmentVariables::new();
    for p in pairs {
        let Some((k, v)) = p.split_once('=') else {
            bail!("--env {p}: write KEY=VALUE");
        };
        map.insert(k.to_string(), v.to_string());
    }
    Ok(Some(map))
}

/// Whether `e` is kilnd saying the thing does not exist.
pub fn is_not_found(e: &anyhow::Error) -> bool {
    e.downcast_ref::<ApiFailure>()
        .is_some_and(|f| f.error_type == "ResourceNotFoundException")
}

/// Runs `kiln build`.
pub async fn run(g: &Global, kilnd: &Kilnd, a: BuildArgs) -> anyhow::Result<ExitCode> {
    let dir = a
        .dir
        .canonicalize()
        .with_context(|| format!("build context {}: no such directory", a.dir.display()))?;
    let dockerfile_path = dir.join("Dockerfile");
    let dockerfile = std::fs::read_to_string(&dockerfile_path).with_context(|| {
        format!(
            "{} has no readable Dockerfile: a build context needs one at its root",
            dir.display()
        )
    })?;
    let name = match &a.name {
        Some(n) => n.clone(),
        None => name_from_dir(&dir)?,
    };
    let base = base_arn(a.base.as_deref(), &dockerfile)?;
    let artifacts = a
        .artifact_dir
        .clone()
        .unwrap_or_else(|| g.home().join("artifacts"));
    let secrets = a
        .secrets
        .iter()
        .map(|s| read_secret(s))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let (zip, stats) = write_artifact(&dir, &artifacts, &name)?;
    let uri = upload(kilnd, &zip, &name).await?;
    if !secrets.is_empty() {
        use base64::Engine as _;
        let map: serde_json::Map<String, serde_json::Value> = secrets
            .into_iter()
            .map(|(id, value)| {
                let encoded = base64::engine::general_purpose::STANDARD.encode(value);
                (id, serde_json::Value::String(encoded))
            })
            .collect();
        let body = serde_json::json!({ "secrets": map });
        kilnd
            .kiln(
                Method::PUT,
                &format!("/kiln/v1/images/{name}/build-secrets"),
                Some(&body),
            )
            .await
            .context("handing the build secrets to kilnd")?;
    }
    let config = ImageVersionConfig {
        base_image_arn: base.clone(),
        base_image_version: None,
        build_role_arn: a.build_role_arn.clone(),
        description: a.description.clone(),
        code_artifact: CodeArtifact::Uri(uri.clone()),
        logging: None,
        egress_network_connectors: None,
        cpu_configurations: None,
        resources: Some(vec![Resources {
            minimum_memory_in_mib: a.memory,
        }]),
        additional_os_capabilities: None,
        hooks: None,
        environment_variables: env_map(&a.env)?,
        kms_key_identifier: None,
    };
    let exists = match kilnd
        .call(&Call::new(Operation::GetMicrovmImage).label("imageIdentifier", &name))
        .await
    {
        Ok(_) => true,
        Err(e) if is_not_found(&e) => false,
        Err(e) => return Err(e),
    };
    let version = if exists {
        let body = UpdateMicrovmImageRequest {
            config,
            client_token: Some(input::client_token()?),
        };
        let call = Call::new(Operation::UpdateMicrovmImage)
            .label("imageIdentifier", &name)
            .json(&body)?;
        kilnd
            .call_as::<UpdateMicrovmImageResponse>(&call)
            .await?
            .image_version
    } else {
        let body = CreateMicrovmImageRequest {
            config,
            name: name.clone(),
            tags: None,
            client_token: Some(input::client_token()?),
        };
        let call = Call::new(Operation::CreateMicrovmImage).json(&body)?;
        kilnd
            .call_as::<CreateMicrovmImageResponse>(&call)
            .await?
            .image_version
    };
    eprintln!(
        "{} image {name} version {version} on {} ({} files, {} KiB zipped, uploaded to {uri})",
        if exists { "updating" } else { "creating" },
        crate::render::image_name(&base),
        stats.files,
        stats.zip_bytes.div_ceil(1024),
    );
    if a.no_wait {
        let v = version_description(kilnd, &name, &version).await?;
        print_version(&name, &v, g.output)?;
        return Ok(ExitCode::SUCCESS);
    }
    let tail = follow(kilnd, &name, &version).await;
    let v = wait_until_built(kilnd, &name, &version).await?;
    print_version(&name, &v, g.output)?;
    if v.state != MicrovmImageVersionState::Successful {
        let tail = match tail {
            Ok(t) => t,
            Err(_) => last_lines(kilnd, &name, &version).await,
        };
        bail!(
            "the build of {name} version {version} ended {}: {}\nlast lines of its log (all of it: kiln logs {name} --version {version}):\n{}",
            v.state,
            v.state_reason.as_deref().unwrap_or("no reason given"),
            tail.iter().map(|l| format!("  {l}")).collect::<Vec<_>>().join("\n")
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// Streams the build log into the progress display until the build ends; its last lines.
async fn follow(kilnd: &Kilnd, name: &str, version: &str) -> anyhow::Result<Vec<String>> {
    let mut progress = BuildProgress::new();
    let result = async {
        let resp = kilnd
            .kiln(
                Method::GET,
                &logs::build_log_path(name, version, true),
                None,
            )
            .await?;
        let mut stream = resp.bytes_stream();
        while let Some(chunk) = stream.next().await {
            progress.feed(&chunk.context("the build log stream from kilnd broke off")?);
        }
        anyhow::Ok(())
    }
    .await;
    let tail = progress.finish();
    if let Err(e) = &result {
        eprintln!("warning: cannot follow the build log ({e:#}); waiting for the build to end");
    }
    result.map(|()| tail)
}

/// The last lines of a version's log, fetched whole.
async fn last_lines(kilnd: &Kilnd, name: &str, version: &str) -> Vec<String> {
    let text = match kilnd
        .kiln(
            Method::GET,
            &logs::build_log_path(name, version, false),
            None,
        )
        .await
    {
        Ok(resp) => resp.text().await.unwrap_or_default(),
        Err(_) => String::new(),
    };
    let lines: Vec<String> = text.lines().map(str::to_string).collect();
    lines[lines.len().saturating_sub(25)..].to_vec()
}

async fn version_description(
    kilnd: &Kilnd,
    name: &str,
    version: &str,
) -> anyhow::Result<MicrovmImageVersionSummary> {
    let call = Call::new(Operation::GetMicrovmImageVersion)
        .label("imageIdentifier", name)
        .label("imageVersion", version);
    kilnd.call_as(&call).await
}

/// Polls the version until its build has ended.
async fn wait_until_built(
    kilnd: &Kilnd,
    name: &str,
    version: &str,
) -> anyhow::Result<MicrovmImageVersionSummary> {
    loop {
        let v = version_description(kilnd, name, version).await?;
        if !matches!(
            v.state,
            MicrovmImageVersionState::Pending | MicrovmImageVersionState::InProgress
        ) {
            return Ok(v);
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

fn print_version(name: &str, v: &MicrovmImageVersionSummary, output: Output) -> anyhow::Result<()> {
    match output {
        Output::Json => {
            let value = serde_json::to_value(v).context("encoding the version")?;
            println!("{}", crate::render::json(&value));
        }
        Output::Table => {
            let mut pairs = vec![
                ("image".to_string(), name.to_string()),
                ("version".to_string(), v.image_version.clone()),
                ("state".to_string(), v.state.to_string()),
                ("status".to_string(), v.status.to_string()),
                ("imageArn".to_string(), v.image_arn.clone()),
            ];
            if let Some(r) = &v.state_reason {
                pairs.push(("stateReason".to_string(), r.clone()));
            }
            print!("{}", key_values(&pairs));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn read_secret_when_file_or_env_then_value_else_error_names_the_fix() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("tok");
        std::fs::write(&file, b"v1").expect("write");

        let from_file = read_secret(&format!("id=a,src={}", file.display())).expect("file");
        let from_env = read_secret("id=b,env=PATH").expect("env");
        let neither = read_secret("id=c").expect_err("no source");

        assert_eq!(from_file, ("a".to_string(), b"v1".to_vec()));
        let path = std::env::var("PATH").expect("PATH").into_bytes();
        assert_eq!(from_env, ("b".to_string(), path));
        assert!(
            neither.to_string().contains("src=FILE or env=VAR"),
            "{neither}"
        );
    }

    #[test]
    fn base_arn_when_no_flag_then_from_dockerfile_else_busybox() {
        let debian = base_arn(None, "# app\nFROM kiln/debian:12\nRUN true\n").expect("arn");
        let busybox = base_arn(None, "FROM kiln/busybox\n").expect("arn");
        let other = base_arn(None, "FROM scratch\n").expect("arn");

        assert_eq!(debian, "arn:aws:lambda:local:aws:microvm-image:debian-12");
        assert_eq!(busybox, "arn:aws:lambda:local:aws:microvm-image:busybox");
        assert_eq!(other, busybox);
        assert_eq!(
            base_arn(None, "FROM python:3.12-slim\n").expect("arn"),
            "arn:aws:lambda:local:aws:microvm-image:al2023-1"
        );
    }

    #[test]
    fn base_arn_when_stages_then_the_image_stages_base() {
        let dockerfile = "FROM kiln/debian:12 AS tools\nFROM kiln/busybox AS app\nFROM app\n";

        let arn = base_arn(None, dockerfile).expect("arn");

        assert_eq!(arn, "arn:aws:lambda:local:aws:microvm-image:busybox");
    }

    #[test]
    fn base_arn_when_flag_then_flag_wins_and_unknown_is_explained() {
        assert_eq!(
            base_arn(Some("debian"), "FROM kiln/busybox\n").expect("arn"),
            "arn:aws:lambda:local:aws:microvm-image:debian-12"
        );
        let err = base_arn(Some("alpine"), "")
            .expect_err("unknown")
            .to_string();
        assert!(err.contains("busybox, debian"), "{err}");
    }

    #[test]
    fn name_from_dir_when_odd_characters_then_dashes() {
        assert_eq!(
            name_from_dir(Path::new("/src/my app.v2")).expect("name"),
            "my-app-v2"
        );
    }

    #[test]
    fn artifact_bucket_when_name_is_a_valid_bucket_then_readable_else_digest() {
        assert_eq!(artifact_bucket("alice"), "kiln-artifacts-alice");
        assert_eq!(artifact_bucket("admin"), "kiln-artifacts-admin");
        let odd = artifact_bucket("Alice@example.com");
        assert!(
            odd.starts_with("kiln-artifacts-") && odd.len() == 31,
            "{odd}"
        );
        assert_ne!(odd, artifact_bucket("alice@example.com"));
    }

    #[test]
    fn write_artifact_when_same_context_twice_then_same_zip() {
        let work = tempfile::tempdir().expect("dir");
        let ctx = work.path().join("ctx");
        std::fs::create_dir(&ctx).expect("mkdir");
        std::fs::write(ctx.join("Dockerfile"), "FROM kiln/busybox\n").expect("write");

        let (a, _) = write_artifact(&ctx, &work.path().join("art"), "web").expect("zip");
        let (b, _) = write_artifact(&ctx, &work.path().join("art"), "web").expect("zip");

        assert_eq!(a, b);
        assert_eq!(
            std::fs::read_dir(work.path().join("art"))
                .expect("dir")
                .count(),
            1
        );
    }
}
