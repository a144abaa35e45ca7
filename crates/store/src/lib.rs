//! MongoDB, the CRM's system of record, which callboard only reads (but for
//! `seed`, which writes demo data, and `create-indexes`).
//!
//! - [`LiveQuery`]: the grouped response computed live, in a constant number
//!   of round trips. It is the baseline, and the answer while a tenant's
//!   cache is cold.
//! - [`indexes`]: the indexes the specification asks for.
//! - [`seed`]: a deterministic generator of demo and benchmark data.

pub mod indexes;
mod live;
pub mod seed;

pub use live::LiveQuery;

/// The CRM's collections.
pub const CALLS: &str = "calls";
pub const USERS: &str = "users";
pub const CALL_STATUS: &str = "call_status";

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("MongoDB: {0}")]
    Mongo(#[from] mongodb::error::Error),
    #[error("refusing to seed: {0}")]
    SeedRefused(String),
}

impl StoreError {
    /// MongoDB stopped the operation at its `maxTimeMS` (MaxTimeMSExpired).
    pub fn is_time_limit(&self) -> bool {
        match self {
            StoreError::Mongo(e) => matches!(*e.kind, mongodb::error::ErrorKind::Command(ref c) if c.code == 50),
            StoreError::SeedRefused(_) => false,
        }
    }

    /// Whether the database could not be reached (as opposed to a command
    /// that failed on a reachable server).
    pub fn is_unavailable(&self) -> bool {
        match self {
            StoreError::Mongo(e) => match *e.kind {
                mongodb::error::ErrorKind::ServerSelection { .. }
                | mongodb::error::ErrorKind::Io(_)
                | mongodb::error::ErrorKind::ConnectionPoolCleared { .. } => true,
                // MaxTimeMSExpired: the query gave up rather than hang.
                mongodb::error::ErrorKind::Command(ref c) => c.code == 50,
                _ => false,
            },
            StoreError::SeedRefused(_) => false,
        }
    }
}
