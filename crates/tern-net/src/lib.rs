//! tern over the network: identities and trust, the QUIC and TCP+TLS
//! transports, the remote endpoint a client uses, and the daemon.

pub mod budget;
pub mod compress;
pub mod config;
pub mod daemon;
pub mod error;
pub mod identity;
pub mod log;
pub mod path;
pub mod proof;
pub mod pull;
pub mod remote;
pub mod server;
pub mod stream;
pub mod tls;
pub mod transport;
pub mod trust;
pub mod url;
pub mod wire;

pub use error::{NetError, Result};
