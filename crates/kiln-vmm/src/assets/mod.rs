//! Guest assets.
