//! The write side: operations the projector plans, applied atomically per
//! tenant.
