//! Host-guest agent.
