//! Boots a real microVM with kiln-init as PID 1 and drives it with `AgentClient`.
//! Ignored by default (needs QEMU and guest assets); run it with
//! `KILN_TEST_KERNEL=vmlinuz KILN_TEST_INITRD=initrd KILN_TEST_DISK=root.ext4 \
//!  KILN_TEST_TSC_KHZ=2445000 cargo test -p kiln-agent --test guest_vm -- --ignored`.
//! The initramfs must hold the static kiln-init as /init and the virtio modules under
//! /kiln/modules; the disk needs /bin/sh.

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, SystemTime};

use kiln_agent::{AgentClient, ExecRequest};

fn asset(var: &str) -> String {
    std::env::var(var).unwrap_or_else(|_| panic!("set {var} (see the top of this file)"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "boots a VM: needs QEMU and KILN_TEST_* assets"]
async fn guest_when_booted_then_agent_serves_and_powers_off() {
    let dir = tempfile::tempdir().expect("temp dir");
    let socket: PathBuf = dir.path().join("agent.sock");
    let disk = dir.path().join("disk.img");
    std::fs::copy(asset("KILN_TEST_DISK"), &disk).expect("copy disk");
    let append = format!(
        "console=ttyS0 reboot=t panic=-1 quiet tsc_early_khz={}",
        asset("KILN_TEST_TSC_KHZ")
    );
    let mut qemu = Command::new("qemu-system-x86_64")
        .args([
            "-M",
            "microvm,x-option-roms=off,isa-serial=on,pit=on,pic=on,rtc=on",
        ])
        .args(["-accel", "tcg", "-cpu", "max", "-m", "512", "-smp", "1"])
        .args([
            "-nodefaults",
            "-no-user-config",
            "-display",
            "none",
            "-no-reboot",
        ])
        .args(["-kernel", &asset("KILN_TEST_KERNEL")])
        .args(["-initrd", &asset("KILN_TEST_INITRD"), "-append", &append])
        .arg("-drive")
        .arg(format!("id=d0,file={},format=raw,if=none", disk.display()))
        .args(["-device", "virtio-blk-device,drive=d0"])
        .args([
            "-netdev",
            "user,id=n0",
            "-device",
            "virtio-net-device,netdev=n0",
        ])
        .args(["-device", "virtio-serial-device", "-chardev"])
        .arg(format!(
            "socket,path={},server=on,wait=off,id=c0",
            socket.display()
        ))
        .args(["-device", "virtserialport,chardev=c0,name=agent"])
        .arg("-serial")
        .arg(format!("file:{}", dir.path().join("console.log").display()))
        .stdin(Stdio::null())
        .spawn()
        .expect("spawn qemu");

    let client = AgentClient::connect(&socket, Duration::from_secs(60))
        .await
        .expect("connect");
    let output = client
        .run(ExecRequest::new(["sh", "-c", "echo $((6 * 7))"]))
        .await
        .expect("run");
    client
        .set_clock(SystemTime::now())
        .await
        .expect("set clock");
    client.add_entropy(&[7u8; 64]).await.expect("entropy");
    client.sync(true).await.expect("sync");
    client.power_off().await.expect("power off");
    let status = qemu.wait().expect("qemu exit");

    assert_eq!(output.stdout, b"42\n");
    assert!(status.success());
}
