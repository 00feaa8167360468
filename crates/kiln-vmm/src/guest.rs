//! The guest session above the [`Vmm`](crate::Vmm) seam: what kiln tells a guest through its
//! agent whatever backend runs it.

use std::time::SystemTime;

use kiln_agent::client::AgentClient;

use crate::VmmError;

/// Bytes of host entropy fed to a guest on each refresh.
const ENTROPY_BYTES: usize = 64;

/// Sets the guest's clock from the host and feeds it fresh entropy: a snapshot restored twice
/// must not share its RNG state, and its clock stood still while it was saved (or paused).
pub async fn refresh(agent: &AgentClient) -> Result<(), VmmError> {
    agent
        .set_clock(SystemTime::now())
        .await
        .map_err(VmmError::agent("setting the guest clock"))?;
    let mut seed = [0u8; ENTROPY_BYTES];
    getrandom::fill(&mut seed)
        .map_err(|e| VmmError::InvalidSpec(format!("host RNG failed: {e}")))?;
    agent
        .add_entropy(&seed)
        .await
        .map_err(VmmError::agent("reseeding the guest RNG"))
}
