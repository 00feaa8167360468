//! The Vmm seam and its QEMU backend.

pub mod accel;
pub mod assets;
pub mod tsc;
