//! The projector (work in progress).
