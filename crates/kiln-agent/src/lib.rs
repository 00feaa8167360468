//! Host-guest agent: the framed protocol, the async host client, and the guest side
//! (the agent server and kiln-init, the guest's PID 1).

pub mod budget;
pub mod client;
pub mod guest;
pub mod proto;

pub use client::{
    AgentClient, AgentError, AppSpec, AppState, CopySpec, CopyStats, ExecEvent, ExecOutput,
    ExecRequest, ExecStream, ExitStatus, FetchSpec, Fetched, FileKind, FileStat, FsErrorKind,
    HelloInfo, HttpFailureKind, HttpRequestSpec, HttpResponse, TtySize, UserInfo,
    MAX_COLLECTED_OUTPUT, MAX_QUEUED_OUTPUT,
};
