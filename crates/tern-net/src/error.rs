//! Errors of the network layer.

use std::io;

use tern_proto::{ErrorMsg, ProtoError};

/// Something that went wrong talking to a peer.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    /// A socket or file operation failed.
    #[error("{0}")]
    Io(#[from] io::Error),
    /// The peer broke the protocol.
    #[error("protocol error: {0}")]
    Proto(#[from] ProtoError),
    /// TLS failed.
    #[error("TLS: {0}")]
    Tls(String),
    /// QUIC failed.
    #[error("QUIC: {0}")]
    Quic(String),
    /// The peer said no.
    #[error("{}", .0.message)]
    Remote(ErrorMsg),
    /// The peer went silent.
    #[error("timed out after {0} s waiting for the peer")]
    Timeout(u64),
    /// The peer closed the connection.
    #[error("connection closed by the peer")]
    Closed,
    /// The server's identity is not the one expected.
    #[error("{0}")]
    Trust(String),
    /// Bad configuration or arguments.
    #[error("{0}")]
    Config(String),
    /// Nothing accepts TCP connections at the address: no daemon there,
    /// or another port. Not worth a retry.
    #[error("connection refused by {0}: is `tern serve` running on that host, listening on that port?")]
    Refused(std::net::SocketAddr),
}

/// Result type of this crate.
pub type Result<T, E = NetError> = std::result::Result<T, E>;
