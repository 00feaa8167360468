//! Network connectors: AWS's five managed ones and the operator's own egress connectors,
//! turned into each VM's ingress rights and egress policy.
//!
//! Values are ARNs (`arn:aws:lambda:<region>:aws:network-connector:aws-network-connector:NAME`
//! for AWS's, `arn:aws:lambda:<region>:<account>:network-connector:<name>` for the
//! operator's) or bare names. Omitted connectors mean HTTP_INGRESS + INTERNET_EGRESS, as on
//! AWS; an unknown connector is an error, never silently "internet".

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use kiln_api::arn::ArnContext;
use kiln_api::ApiError;
use kiln_net::policy::Allow;
use kiln_net::{Egress, Gateway, GatewayConfig, VmEgress};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

/// AWS's managed connectors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Managed {
    /// The public internet.
    InternetEgress,
    /// HTTP(S) through the endpoint.
    HttpIngress,
    /// Shells through the endpoint.
    ShellIngress,
    /// Every ingress.
    AllIngress,
    /// No ingress.
    NoIngress,
}

impl Managed {
    const ALL: [(Managed, &'static str); 5] = [
        (Managed::InternetEgress, "INTERNET_EGRESS"),
        (Managed::HttpIngress, "HTTP_INGRESS"),
        (Managed::ShellIngress, "SHELL_INGRESS"),
        (Managed::AllIngress, "ALL_INGRESS"),
        (Managed::NoIngress, "NO_INGRESS"),
    ];

    fn by_name(name: &str) -> Option<Managed> {
        Managed::ALL
            .iter()
            .find(|(_, n)| n.eq_ignore_ascii_case(name))
            .map(|(m, _)| *m)
    }

    /// Its name.
    pub fn name(self) -> &'static str {
        Managed::ALL
            .iter()
            .find(|(m, _)| *m == self)
            .map(|(_, n)| *n)
            .unwrap_or("?")
    }

    fn is_egress(self) -> bool {
        self == Managed::InternetEgress
    }
}

/// What one connector value names.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Named {
    Managed(Managed),
    Operator(String),
}

/// Which ingress a MicroVM accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Ingress {
    /// HTTP(S) requests through the endpoint.
    pub http: bool,
    /// Shells through the endpoint.
    pub shell: bool,
}

/// A MicroVM's (or build's) network, decided from its connectors.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    /// What it accepts through the endpoint.
    pub ingress: Ingress,
    /// What it may reach.
    pub egress: Egress,
    /// The egress connectors it was given (names, for display).
    pub egress_connectors: Vec<String>,
}

impl Plan {
    /// The plan as MicroVM details show it.
    pub fn describe(&self) -> Value {
        let (kind, allow) = match &self.egress {
            Egress::None => ("none", Vec::new()),
            Egress::Internet { extra } => {
                ("internet", extra.iter().map(|a| a.to_string()).collect())
            }
            Egress::Only { allow } => ("allow-list", allow.iter().map(|a| a.to_string()).collect()),
        };
        json!({
            "ingress": self.ingress,
            "egress": {
                "kind": kind,
                "connectors": self.egress_connectors,
                "allow": allow,
                "neverReachable": ["loopback", "link-local (169.254.0.0/16, fe80::/10)", "the host's own addresses", "other VMs"],
            }
        })
    }
}

/// An operator-defined egress connector.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Connector {
    /// Its name (`[a-z0-9-]`, 1–64).
    pub name: String,
    /// What it allows.
    pub allow: Vec<Allow>,
    /// A note for people.
    #[serde(default)]
    pub description: String,
    /// When it was made (seconds since the epoch).
    pub created_at: f64,
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct ConnectorFile {
    connectors: Vec<Connector>,
}

/// Connectors, the egress gateway, and the operator's allowances.
#[derive(Debug)]
pub struct Network {
    /// The egress gateway every VM's traffic goes through.
    pub gateway: Gateway,
    ctx: ArnContext,
    extra: Vec<Allow>,
    path: PathBuf,
    connectors: Mutex<Vec<Connector>>,
}

impl Network {
    /// Loads the operator's connectors from `<home>/connectors.json`.
    pub fn load(
        home: &Path,
        ctx: ArnContext,
        extra: Vec<Allow>,
        gateway: GatewayConfig,
    ) -> anyhow::Result<Network> {
        let path = home.join("connectors.json");
        let connectors = match std::fs::read(&path) {
            Ok(bytes) => {
                serde_json::from_slice::<ConnectorFile>(&bytes)
                    .map_err(|e| {
                        anyhow::anyhow!("{} is unreadable: {e} (fix or remove it)", path.display())
                    })?
                    .connectors
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(e) => return Err(anyhow::anyhow!("reading {}: {e}", path.display())),
        };
        Ok(Network {
            gateway: Gateway::new(gateway),
            ctx,
            extra,
            path,
            connectors: Mutex::new(connectors),
        })
    }

    /// The ARN of operator connector `name`.
    pub fn arn(&self, name: &str) -> String {
        format!(
            "arn:aws:lambda:{}:{}:network-connector:{name}",
            self.ctx.region, self.ctx.account
        )
    }

    fn lookup(&self, value: &str) -> Result<Named, ApiError> {
        let unknown = || {
            ApiError::validation(format!(
                "Unknown network connector {value:?}: use one of AWS's \
                 (arn:aws:lambda:<region>:aws:network-connector:aws-network-connector:\
                 {{INTERNET_EGRESS|HTTP_INGRESS|SHELL_INGRESS|ALL_INGRESS|NO_INGRESS}}, or the bare name) \
                 or an operator connector listed by `kiln connectors ls`"
            ))
        };
        let name = if let Some(rest) = value.strip_prefix("arn:aws:lambda:") {
            let parts: Vec<&str> = rest.splitn(4, ':').collect();
            match parts.as_slice() {
                [_region, "aws", "network-connector", tail] => {
                    let name = tail
                        .strip_prefix("aws-network-connector:")
                        .ok_or_else(unknown)?;
                    return Managed::by_name(name)
                        .map(Named::Managed)
                        .ok_or_else(unknown);
                }
                [_region, account, "network-connector", name] if *account == self.ctx.account => {
                    *name
                }
                _ => return Err(unknown()),
            }
        } else if let Some(m) = Managed::by_name(value) {
            return Ok(Named::Managed(m));
        } else {
            value
        };
        let connectors = self.connectors.lock().unwrap_or_else(|e| e.into_inner());
        connectors
            .iter()
            .find(|c| c.name == name)
            .map(|c| Named::Operator(c.name.clone()))
            .ok_or_else(unknown)
    }

    fn allow_of(&self, name: &str) -> Vec<Allow> {
        let connectors = self.connectors.lock().unwrap_or_else(|e| e.into_inner());
        connectors
            .iter()
            .find(|c| c.name == name)
            .map(|c| c.allow.clone())
            .unwrap_or_default()
    }

    /// The egress of a set of egress connectors (`None`: omitted → INTERNET_EGRESS).
    fn egress(
        &self,
        egress: Option<&[String]>,
        member: &str,
    ) -> Result<(Egress, Vec<String>), ApiError> {
        let values: Vec<String> = match egress {
            None => vec!["INTERNET_EGRESS".to_string()],
            Some(v) => v.to_vec(),
        };
        let mut internet = false;
        let mut allow = Vec::new();
        let mut names = Vec::new();
        for v in &values {
            match self.lookup(v)? {
                Named::Managed(Managed::InternetEgress) => {
                    internet = true;
                    names.push("INTERNET_EGRESS".to_string());
                }
                Named::Managed(m) => {
                    return Err(ApiError::validation(format!(
                        "{} is an ingress connector; it cannot be given in {member}",
                        m.name()
                    )))
                }
                Named::Operator(name) => {
                    allow.extend(self.allow_of(&name));
                    names.push(name);
                }
            }
        }
        let egress = if internet {
            allow.extend(self.extra.iter().cloned());
            Egress::Internet { extra: allow }
        } else if names.is_empty() {
            Egress::None
        } else {
            allow.extend(self.extra.iter().cloned());
            Egress::Only { allow }
        };
        Ok((egress, names))
    }

    /// A MicroVM's network from RunMicrovm's connectors.
    pub fn runtime_plan(
        &self,
        ingress: Option<&[String]>,
        egress: Option<&[String]>,
    ) -> Result<Plan, ApiError> {
        let ingress_values: Vec<String> = match ingress {
            None => vec!["HTTP_INGRESS".into()],
            Some(v) => v.to_vec(),
        };
        let mut kinds = Vec::new();
        for v in &ingress_values {
            match self.lookup(v)? {
                Named::Managed(m) if !m.is_egress() => kinds.push(m),
                Named::Managed(m) => {
                    return Err(ApiError::validation(format!(
                        "{} is an egress connector; give it in egressNetworkConnectors",
                        m.name()
                    )))
                }
                Named::Operator(name) => {
                    return Err(ApiError::validation(format!(
                        "{name} is an egress connector; give it in egressNetworkConnectors"
                    )))
                }
            }
        }
        if kinds.contains(&Managed::AllIngress) && kinds.len() > 1 {
            return Err(ApiError::validation(
                "ALL_INGRESS cannot be combined with other ingress network connectors",
            ));
        }
        if kinds.contains(&Managed::NoIngress) && kinds.len() > 1 {
            return Err(ApiError::validation(
                "NO_INGRESS cannot be combined with other ingress network connectors",
            ));
        }
        let all = kinds.contains(&Managed::AllIngress);
        let ingress = Ingress {
            http: all || kinds.contains(&Managed::HttpIngress),
            shell: all || kinds.contains(&Managed::ShellIngress),
        };
        let (egress, egress_connectors) = self.egress(egress, "egressNetworkConnectors")?;
        Ok(Plan {
            ingress,
            egress,
            egress_connectors,
        })
    }

    /// A build's egress from CreateMicrovmImage's `egressNetworkConnectors` (at most one,
    /// checked by the API's validation).
    pub fn build_egress(&self, egress: Option<&[String]>) -> Result<Egress, ApiError> {
        self.egress(egress, "egressNetworkConnectors")
            .map(|(e, _)| e)
    }

    /// What the VMM needs to attach the gateway (`None`: no egress at all).
    pub fn vm_egress(&self, vm: &str, egress: &Egress) -> Option<VmEgress> {
        (*egress != Egress::None).then(|| VmEgress {
            gateway: self.gateway.clone(),
            vm: vm.to_string(),
            policy: egress.clone(),
        })
    }

    /// The operator's connectors.
    pub fn connectors(&self) -> Vec<Connector> {
        self.connectors
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// One connector as the API shows it.
    pub fn describe(&self, c: &Connector) -> Value {
        json!({
            "name": c.name,
            "arn": self.arn(&c.name),
            "allow": c.allow,
            "description": c.description,
            "createdAt": c.created_at,
        })
    }

    /// Adds a connector; a name already taken is a conflict.
    pub fn create(
        &self,
        name: &str,
        allow: Vec<Allow>,
        description: String,
    ) -> Result<Connector, ApiError> {
        let ok = !name.is_empty()
            && name.len() <= 64
            && name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
            && Managed::by_name(name).is_none();
        if !ok {
            return Err(ApiError::validation(format!(
                "connector name {name:?}: use 1-64 lower-case letters, digits and '-'"
            )));
        }
        if allow.is_empty() {
            return Err(ApiError::validation(
                "a connector needs at least one --allow entry (a name, *.name or CIDR, with optional :ports)",
            ));
        }
        let mut connectors = self.connectors.lock().unwrap_or_else(|e| e.into_inner());
        if connectors.iter().any(|c| c.name == name) {
            return Err(ApiError::conflict(
                "NetworkConnector",
                name,
                format!("connector {name} exists already"),
            ));
        }
        let c = Connector {
            name: name.to_string(),
            allow,
            description,
            created_at: crate::now(),
        };
        connectors.push(c.clone());
        if let Err(e) = self.save(&connectors) {
            connectors.pop();
            return Err(e);
        }
        Ok(c)
    }

    /// Removes a connector (MicroVMs running with it keep the policy they started with).
    pub fn delete(&self, name: &str) -> Result<Connector, ApiError> {
        let mut connectors = self.connectors.lock().unwrap_or_else(|e| e.into_inner());
        let Some(i) = connectors.iter().position(|c| c.name == name) else {
            return Err(ApiError::not_found("NetworkConnector", name));
        };
        let removed = connectors.remove(i);
        if let Err(e) = self.save(&connectors) {
            connectors.insert(i, removed);
            return Err(e);
        }
        Ok(removed)
    }

    fn save(&self, connectors: &[Connector]) -> Result<(), ApiError> {
        let file = ConnectorFile {
            connectors: connectors.to_vec(),
        };
        let bytes =
            serde_json::to_vec_pretty(&file).map_err(|e| ApiError::internal(e.to_string()))?;
        let tmp = self.path.with_extension("json.tmp");
        let write = || -> std::io::Result<()> {
            use std::io::Write;
            use std::os::unix::fs::OpenOptionsExt;
            let mut f = std::fs::OpenOptions::new()
                .create(true)
                .truncate(true)
                .write(true)
                .mode(0o600)
                .open(&tmp)?;
            f.write_all(&bytes)?;
            f.sync_all()?;
            std::fs::rename(&tmp, &self.path)
        };
        write().map_err(|e| ApiError::internal(format!("saving {}: {e}", self.path.display())))
    }
}

/// Shared by the API and the supervisor.
pub type SharedNetwork = Arc<Network>;

#[cfg(test)]
mod tests {
    use super::*;

    fn network() -> (tempfile::TempDir, Network) {
        let dir = tempfile::tempdir().expect("dir");
        let n = Network::load(
            dir.path(),
            ArnContext::default(),
            Vec::new(),
            GatewayConfig::default(),
        )
        .expect("load");
        (dir, n)
    }

    fn strings(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn runtime_plan_when_omitted_then_http_ingress_and_internet() {
        let (_d, n) = network();
        let plan = n.runtime_plan(None, None).expect("plan");
        assert!(plan.ingress.http && !plan.ingress.shell);
        assert_eq!(plan.egress, Egress::Internet { extra: vec![] });
    }

    #[test]
    fn runtime_plan_when_arns_then_they_mean_their_names() {
        let (_d, n) = network();
        let plan = n
            .runtime_plan(
                Some(&strings(&["arn:aws:lambda:us-east-1:aws:network-connector:aws-network-connector:SHELL_INGRESS"])),
                Some(&[]),
            )
            .expect("plan");
        assert!(plan.ingress.shell && !plan.ingress.http);
        assert_eq!(plan.egress, Egress::None);
    }

    #[test]
    fn runtime_plan_when_all_ingress_combined_then_validation_error() {
        let (_d, n) = network();
        let err = n
            .runtime_plan(Some(&strings(&["ALL_INGRESS", "HTTP_INGRESS"])), None)
            .expect_err("combined");
        assert_eq!(err.error_type(), "ValidationException");
    }

    #[test]
    fn runtime_plan_when_unknown_connector_then_error_not_internet() {
        let (_d, n) = network();
        for bad in [
            "internet",
            "nc-1",
            "arn:aws:lambda:local:aws:network-connector:aws-network-connector:VPC",
        ] {
            let err = n.runtime_plan(None, Some(&strings(&[bad]))).expect_err(bad);
            assert!(
                err.to_string().contains("Unknown network connector"),
                "{bad}: {err}"
            );
        }
        let err = n
            .runtime_plan(None, Some(&strings(&["HTTP_INGRESS"])))
            .expect_err("ingress as egress");
        assert!(err.to_string().contains("ingress connector"));
    }

    #[test]
    fn create_when_operator_connector_then_usable_by_name_and_arn() {
        let (dir, n) = network();
        n.create(
            "svc",
            vec!["svc-a.test:8443".parse().expect("entry")],
            String::new(),
        )
        .expect("create");
        let arn = n.arn("svc");
        for v in ["svc", arn.as_str()] {
            let plan = n.runtime_plan(None, Some(&strings(&[v]))).expect(v);
            assert!(matches!(plan.egress, Egress::Only { ref allow } if allow.len() == 1));
        }
        let again = Network::load(
            dir.path(),
            ArnContext::default(),
            Vec::new(),
            GatewayConfig::default(),
        )
        .expect("reload");
        assert_eq!(again.connectors().len(), 1);
        assert!(n
            .create("svc", vec!["x.test".parse().expect("entry")], String::new())
            .is_err());
    }
}
