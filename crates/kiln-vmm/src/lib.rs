//! The Vmm seam and its QEMU backend.
