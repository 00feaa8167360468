//! A guest's egress through the gateway: DNS answered by kiln's resolver, TCP relayed only
//! where the policy allows.

mod common;

use std::collections::HashMap;

use common::{busybox_spec, host, scratch, sh};
use kiln_net::{Egress, Gateway, GatewayConfig, VmEgress};
use kiln_vmm::{BootOptions, NetSpec};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn egress_when_names_are_allowed_then_only_they_resolve() {
    let dir = scratch();
    let mut spec = busybox_spec(dir.path(), false);
    spec.network = Some(NetSpec::default());
    let mut hosts = HashMap::new();
    hosts.insert(
        "svc-a.test".to_string(),
        vec!["10.213.250.2".parse().expect("ip")],
    );
    let gateway = Gateway::new(GatewayConfig {
        hosts,
        ..GatewayConfig::default()
    });
    let opts = BootOptions {
        egress: Some(VmEgress {
            gateway: gateway.clone(),
            vm: "t".into(),
            policy: Egress::Only {
                allow: vec!["svc-a.test:443".parse().expect("entry")],
            },
        }),
        ..BootOptions::default()
    };
    let vm = host().0.vmm.boot(spec, opts).await.expect("boot");

    let (allowed, _) = sh(
        vm.agent(),
        "cat /etc/resolv.conf; timeout 20 nslookup svc-a.test 2>&1; echo rc=$?",
    )
    .await;
    let (refused, _) = sh(
        vm.agent(),
        "timeout 20 nslookup svc-b.test 2>&1; echo rc=$?",
    )
    .await;
    let flows = gateway.flows("t");
    let _ = vm.terminate().await;

    assert!(allowed.contains("10.213.250.2"), "{allowed}");
    assert!(!refused.contains("rc=0"), "{refused}");
    assert!(
        flows
            .iter()
            .any(|f| f.name.as_deref() == Some("svc-b.test") && !f.allowed),
        "{flows:?}"
    );
}
