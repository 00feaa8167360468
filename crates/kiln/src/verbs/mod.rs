//! kiln's own verbs over the API: build, run, ls, curl, shell, exec, cp, suspend/resume/rm,
//! keys, events, quotas, usage.

pub mod build;
pub mod connectors;
pub mod curl;
pub mod e2b;
pub mod events;
pub mod keys;
pub mod ls;
pub mod quotas;
pub mod run;
pub mod sandbox;
pub mod session;
pub mod shell;
pub mod usage;
