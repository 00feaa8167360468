//! Base images, root filesystems and disk tools.
//!
//! [`disk`] turns a directory into an ext4 image without mounting anything; [`base`] builds
//! the managed base images (today the tiny busybox base) under `<home>/bases/`.

pub mod base;
pub mod disk;
