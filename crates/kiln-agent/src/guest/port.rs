//! Finding the virtio-serial port the agent serves on (there is no udev in the guest).

use std::fs::{File, OpenOptions};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

const PORTS_DIR: &str = "/sys/class/virtio-ports";
const LINKS_DIR: &str = "/dev/virtio-ports";

/// The device node of the virtio-serial port called `name`, creating the
/// `/dev/virtio-ports/<name>` links for every port seen on the way.
pub fn find_port(name: &str) -> Option<PathBuf> {
    let entries = std::fs::read_dir(PORTS_DIR).ok()?;
    let mut found = None;
    for entry in entries.flatten() {
        let Ok(port_name) = std::fs::read_to_string(entry.path().join("name")) else {
            continue;
        };
        let port_name = port_name.trim();
        let node = entry.file_name();
        let device = Path::new("/dev").join(&node);
        if !port_name.is_empty() {
            let _ = std::fs::create_dir_all(LINKS_DIR);
            let _ = std::os::unix::fs::symlink(
                Path::new("..").join(&node),
                Path::new(LINKS_DIR).join(port_name),
            );
        }
        if port_name == name {
            found = Some(device);
        }
    }
    found
}

/// Waits, forever if need be, until the port called `name` exists and opens read-write.
pub fn open_port(name: &str) -> (PathBuf, File) {
    let start = Instant::now();
    let mut next_report = Duration::from_secs(5);
    loop {
        if let Some(device) = find_port(name) {
            match OpenOptions::new().read(true).write(true).open(&device) {
                Ok(file) => return (device, file),
                Err(e) if start.elapsed() >= next_report => {
                    crate::console!("cannot open {} yet: {e}", device.display())
                }
                Err(_) => {}
            }
        }
        if start.elapsed() >= next_report {
            crate::console!(
                "still waiting for virtio-serial port {name:?} after {} s (is a virtserialport with name={name} attached?)",
                start.elapsed().as_secs()
            );
            next_report *= 2;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}
