//! Cold boots of the busybox base: exec through the agent, streaming, concurrency, faults.

mod common;

use std::time::Duration;

use common::{busybox_spec, host, process_exists, scratch, sh};
use kiln_agent::client::ExecRequest;
use kiln_vmm::{BootOptions, MicroVm, PortForward, VmStatus, VmmError};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// GET / through the VM's forward on `port` (inside its network namespace); the whole
/// response as text.
async fn http_get(vm: &impl MicroVm, port: u16) -> String {
    let mut s = vm.connect_forward(port).await.expect("connect");
    s.write_all(b"GET / HTTP/1.0\r\n\r\n")
        .await
        .expect("request");
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).await.expect("response");
    String::from_utf8_lossy(&buf).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn boot_when_busybox_then_exec_streams_runs_concurrently_and_survives_qemu_death() {
    let dir = scratch();
    let spec = busybox_spec(dir.path(), false);
    let mut vm = host()
        .0
        .vmm
        .boot(spec, BootOptions::default())
        .await
        .expect("boot");

    let (hello, code) = sh(vm.agent(), "echo hello from $(uname -s); exit 3").await;
    let (big, _) = sh(vm.agent(), "head -c 8000000 /dev/zero | tr '\\0' x").await;
    let waiter = {
        let agent = vm.agent().clone();
        tokio::spawn(async move {
            sh(
                &agent,
                "while [ ! -e /tmp/go ]; do sleep 0.05; done; echo released",
            )
            .await
        })
    };
    sh(vm.agent(), "sleep 0.3; touch /tmp/go").await;
    let (released, _) = waiter.await.expect("waiter task");
    let timed_out = vm
        .agent()
        .run(ExecRequest::new(["sleep", "30"]).timeout(Duration::from_millis(500)))
        .await
        .expect("exec with timeout");

    assert_eq!(hello.trim(), "hello from Linux");
    assert_eq!(code, Some(3));
    assert_eq!(big.len(), 8_000_000);
    assert!(big.bytes().all(|b| b == b'x'));
    assert_eq!(released.trim(), "released");
    assert!(timed_out.timed_out);

    // A forward added at run time reaches a server in the guest; pause and continue.
    sh(
        vm.agent(),
        "mkdir -p /www && echo served > /www/index.html && httpd -p 8080 -h /www",
    )
    .await;
    let port = kiln_vmm::free_port().expect("free port");
    vm.add_forward(PortForward {
        host_port: port,
        guest_port: 8080,
    })
    .await
    .expect("hostfwd_add");
    let page = http_get(&vm, port).await;
    let from_host = tokio::net::TcpStream::connect(("127.0.0.1", port)).await;
    vm.pause().await.expect("pause");
    let paused = vm.status().await;
    vm.resume().await.expect("continue");
    let resumed = vm.status().await;

    assert!(page.ends_with("served\n"), "{page}");
    assert!(
        from_host.is_err(),
        "the VM's forward is a listener on the host's loopback: any local process reaches the guest"
    );
    assert_eq!(paused, VmStatus::Paused);
    assert_eq!(resumed, VmStatus::Running);

    // QEMU dying mid-run: status says so, agent calls fail instead of hanging.
    let pid = vm.pid();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .expect("kill QEMU");
    tokio::time::sleep(Duration::from_millis(200)).await;
    let status = vm.status().await;
    let ping = vm.agent().ping().await;
    vm.terminate().await.expect("terminate a dead VM");

    assert!(matches!(status, VmStatus::Exited(_)), "{status:?}");
    assert!(ping.is_err());
    assert!(!process_exists(pid));
    assert!(!dir.path().join("vm").exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn boot_when_inputs_are_bad_then_errors_name_them_and_nothing_is_left() {
    let dir = scratch();
    let vmm = &host().0.vmm;

    let mut no_disk = busybox_spec(dir.path(), false);
    no_disk.disks[0].path = dir.path().join("nope.qcow2");
    let missing = vmm
        .boot(no_disk, BootOptions::default())
        .await
        .err()
        .expect("missing disk fails");

    let mut huge = busybox_spec(&dir.path().join("huge"), false);
    huge.memory_mib = 1 << 20; // 1 TiB: more than the host can back
    let died = vmm
        .boot(huge, BootOptions::default())
        .await
        .err()
        .expect("absurd memory fails");

    let garbage = dir.path().join("garbage.raw");
    std::fs::write(&garbage, vec![0xa5u8; 4 << 20]).expect("garbage disk");
    let mut not_ext4 = busybox_spec(&dir.path().join("g"), false);
    not_ext4.disks[0].path = garbage;
    not_ext4.disks[0].format = kiln_vmm::DiskFormat::Raw;
    let unbootable = vmm
        .boot(
            not_ext4,
            BootOptions {
                agent_timeout: Duration::from_secs(120),
                ..BootOptions::default()
            },
        )
        .await
        .err()
        .expect("a disk that is not ext4 fails");

    let mut no_kernel = busybox_spec(&dir.path().join("k"), false);
    no_kernel.kernel = dir.path().join("vmlinuz-gone");
    let kernel_missing = vmm
        .boot(no_kernel, BootOptions::default())
        .await
        .err()
        .expect("missing kernel fails");

    let mut deaf = busybox_spec(&dir.path().join("deaf"), false);
    deaf.cmdline_extra.push("kiln.port=nonexistent".into());
    let silent = vmm
        .boot(
            deaf,
            BootOptions {
                agent_timeout: Duration::from_secs(20),
                ..BootOptions::default()
            },
        )
        .await
        .err()
        .expect("an agent on no port never answers");

    assert!(
        matches!(
            &missing,
            VmmError::Missing {
                what: "disk image",
                ..
            }
        ),
        "{missing}"
    );
    assert!(missing.to_string().contains("nope.qcow2"));
    assert!(matches!(&died, VmmError::QemuDied { .. }), "{died}");
    assert!(died.to_string().to_lowercase().contains("memory"), "{died}");
    assert!(unbootable.to_string().contains("FATAL"), "{unbootable}");
    assert!(!dir.path().join("vm").exists());
    assert!(!dir.path().join("huge/vm").exists());
    assert!(!dir.path().join("g/vm").exists());
    assert!(
        matches!(
            &kernel_missing,
            VmmError::Missing {
                what: "guest kernel",
                ..
            }
        ),
        "{kernel_missing}"
    );
    assert!(
        kernel_missing.to_string().contains("kiln doctor"),
        "{kernel_missing}"
    );
    assert!(
        matches!(&silent, VmmError::AgentUnresponsive { .. }),
        "{silent}"
    );
    assert!(
        silent
            .to_string()
            .contains("still waiting for virtio-serial port"),
        "{silent}"
    );
    assert!(!dir.path().join("deaf/vm").exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attach_when_the_handle_is_gone_then_the_running_vm_is_reachable_again() {
    let dir = scratch();
    let vmm = &host().0.vmm;
    let vm = vmm
        .boot(busybox_spec(dir.path(), false), BootOptions::default())
        .await
        .expect("boot");
    sh(vm.agent(), "echo kept > /tmp/state").await;
    let pid = vm.pid();
    // What a daemon crash does: the handle disappears, QEMU keeps running.
    drop(vm);

    let again = vmm.attach(&dir.path().join("vm")).await.expect("attach");
    let (state, _) = sh(again.agent(), "cat /tmp/state").await;
    let same_pid = again.pid();
    again.terminate().await.expect("terminate");
    let gone = vmm.attach(&dir.path().join("vm")).await;

    assert_eq!(state, "kept\n");
    assert_eq!(same_pid, pid);
    assert!(!process_exists(pid));
    assert!(gone.is_err());
}
