//! The image's runtime hooks (AWS contract: POST `/aws/lambda-microvms/runtime/v1/<hook>` on
//! the hooks port inside the guest), called through the guest agent.

use std::time::Duration;

use kiln_vmm::MicroVm;
use serde_json::Value;

/// How long a hook call waits before trying again when nothing listens on the hooks port.
const REFUSED_RETRY: Duration = Duration::from_millis(50);

/// The `microvmHooks` of an image version and the port its hooks listener uses.
#[derive(Debug, Clone, Default)]
pub(super) struct SessionHooks {
    port: u16,
    hooks: kiln_api::shapes::common::MicrovmHooks,
}

impl SessionHooks {
    /// The hooks in a stored version spec (an `ImageVersionConfig` as JSON).
    pub(super) fn of(spec: &Value) -> SessionHooks {
        let h: kiln_api::shapes::common::Hooks =
            serde_json::from_value(spec["hooks"].clone()).unwrap_or_default();
        SessionHooks {
            port: h.port.map(|p| p as u16).unwrap_or(8080),
            hooks: h.microvm_hooks.unwrap_or_default(),
        }
    }

    /// The timeout of `hook` when the image enables it.
    pub(super) fn enabled(&self, hook: &str) -> Option<Duration> {
        use kiln_api::shapes::common::HookState::Enabled;
        let h = &self.hooks;
        let (state, secs) = match hook {
            "run" => (h.run, h.run_timeout_in_seconds),
            "resume" => (h.resume, h.resume_timeout_in_seconds),
            "suspend" => (h.suspend, h.suspend_timeout_in_seconds),
            "terminate" => (h.terminate, h.terminate_timeout_in_seconds),
            _ => (None, None),
        };
        (state == Some(Enabled))
            .then(|| Duration::from_secs(secs.unwrap_or(30).clamp(1, 60) as u64))
    }

    /// Calls `hook` with `body` through the guest agent (AWS contract: POST
    /// `/aws/lambda-microvms/runtime/v1/<hook>` on the hooks port); 2xx is success. While
    /// nothing listens on the port (a listener between two connections when the snapshot
    /// was taken) the call is tried again until the hook's timeout: the platform polls.
    pub(super) async fn call(
        &self,
        vm: &dyn MicroVm,
        hook: &str,
        body: &[u8],
    ) -> Result<(), String> {
        let Some(timeout) = self.enabled(hook) else {
            return Ok(());
        };
        let deadline = tokio::time::Instant::now() + timeout;
        let answer = loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            let mut req = kiln_image::build::hook_request(self.port, hook, left);
            req.body = body.to_vec();
            match vm.agent().http_request(req).await {
                Err(kiln_agent::AgentError::Http {
                    kind: kiln_agent::proto::HttpFailureKind::Refused,
                    ..
                }) if left > REFUSED_RETRY => tokio::time::sleep(REFUSED_RETRY).await,
                answer => break answer,
            }
        };
        match answer {
            Ok(r) if (200..300).contains(&r.status) => Ok(()),
            Ok(r) => Err(format!(
                "the {hook} hook answered {}: {}",
                r.status,
                String::from_utf8_lossy(&r.body)
                    .chars()
                    .take(200)
                    .collect::<String>()
            )),
            Err(e) => Err(format!("the {hook} hook failed: {e}")),
        }
    }
}
