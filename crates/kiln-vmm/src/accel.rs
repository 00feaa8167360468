//! Accelerator probe.
