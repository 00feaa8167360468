//! What a build leaves besides the snapshot: how the app was started and how to reach it.

use serde::{Deserialize, Serialize};

/// The image's runtime configuration, stored beside its snapshot as `image.json`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ImageConfig {
    /// The app's argv (ENTRYPOINT and CMD combined as Docker does).
    pub app_argv: Vec<String>,
    /// Environment the app runs with (ENV and the API's environment variables).
    pub env: Vec<(String, String)>,
    /// Working directory.
    pub workdir: String,
    /// User the app runs as.
    pub uid: u32,
    /// Group the app runs as.
    pub gid: u32,
    /// Ports from EXPOSE.
    pub exposed_ports: Vec<u16>,
    /// The port clients reach by default (8080, else the first EXPOSEd port).
    pub app_port: u16,
    /// The port of the app's lifecycle-hooks listener.
    pub hooks_port: u16,
    /// The signal that stops the app (STOPSIGNAL), as a name.
    pub stop_signal: String,
    /// LABELs.
    pub labels: Vec<(String, String)>,
    /// How readiness was established before the snapshot.
    pub readiness: String,
    /// The check that established it, which may be run again at any time (a pooled VM is
    /// checked once more before it is paused). Images built before it was recorded: a TCP
    /// connection.
    #[serde(default)]
    pub ready_check: ReadyCheck,
    /// The base image the build started from (`name version`).
    pub base: String,
    /// The registry image's manifest digest (linux/amd64), when FROM named a registry image.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base_digest: Option<String>,
    /// The digest of the index its tag named, when it named one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base_index_digest: Option<String>,
}

/// What tells kiln that an app is ready: the image's `ready` hook, else its HEALTHCHECK,
/// else its port accepting a TCP connection. Each is safe to run again while the app
/// serves: the platform polls it until it passes, as Docker and load balancers do.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", tag = "kind")]
pub enum ReadyCheck {
    /// `POST /aws/lambda-microvms/runtime/v1/ready` on the hooks port answers 200.
    Hook {
        /// The hooks listener's guest port.
        port: u16,
    },
    /// The HEALTHCHECK command exits 0 (run as the app's user, with its env and workdir).
    Healthcheck {
        /// Its argv.
        argv: Vec<String>,
    },
    /// The app's port accepts a TCP connection.
    #[default]
    Tcp,
}
