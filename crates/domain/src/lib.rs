//! callboard's contract types, shared by every other crate.
//!
//! Values here can only hold valid data: a [`TenantId`] comes from a verified
//! token, a [`Limit`] is always within bounds, a [`StatusKey`] is the one
//! canonical form of an int-or-numeric-string status id. Parsing happens at
//! the boundary (HTTP parameters, MongoDB documents), never in handlers.
//!
//! The crate does no I/O: it turns raw documents into the grouped response
//! ([`render`]) and defines the order calls are shown in ([`CallOrder`]).

mod freshness;
mod ids;
mod order;
mod params;
pub mod render;
mod response;
mod status;

pub use freshness::{rfc3339_ms, ClusterTime, Freshness, MinAsOf, Watermark};
pub use ids::{CallId, DocKey, StatusKey, TenantId, UserId};
pub use order::CallOrder;
pub use params::{GroupedRequest, Limit, ParamError, ParamValue, MAX_LIMIT_CEILING};
pub use response::{assemble, GroupCalls, GroupedBody, GROUPED_MESSAGE};
pub use status::{is_deleted, Status, StatusRecord, StatusScope};
