//! Base images and disk tools.
