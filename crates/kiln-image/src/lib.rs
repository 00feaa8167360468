//! Build contexts, Dockerfiles, base images, root filesystems and disk tools.
//!
//! [`context`] unpacks an uploaded zip into a build context (hostile input: bounded and
//! confined), honouring [`dockerignore`]; [`dockerfile`] parses the Dockerfile; [`disk`]
//! turns a directory into an ext4 image without mounting anything; [`base`] builds the
//! managed base images (Debian 12 and the tiny busybox base) under `<home>/bases/`;
//! [`build`] runs a Dockerfile in a build VM and snapshots the started app into an image.

pub mod base;
pub mod build;
pub mod context;
pub mod disk;
pub mod dockerfile;
pub mod dockerignore;
pub mod oci;
