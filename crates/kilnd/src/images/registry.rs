//! How builds pull `FROM <registry image>`: kilnd's mirrors, credentials and each
//! principal's own blob cache (`<home>/cache/registry/<principal>/`), so one principal's
//! pulls never serve, or reveal, another's.

use std::path::Path;

use kiln_image::oci::RegistryOptions;

use crate::config::Config;

/// The registry options of a build owned by `owner`.
pub fn options(config: &Config, home: &Path, owner: &str) -> RegistryOptions {
    RegistryOptions {
        mirrors: config.registry_mirrors.clone(),
        insecure: config.registry_insecure.clone(),
        credentials: config.registry_credentials.clone(),
        cache_dir: home
            .join("cache")
            .join("registry")
            .join(kiln_image::build::mounts::safe_name(owner)),
        cache_max_bytes: config.registry_cache_mib.saturating_mul(1 << 20),
    }
}
