//! Host TSC frequency.
