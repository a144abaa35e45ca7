//! The allocator every callboard binary runs with, and the one
//! process-wide memory setting `callboard` makes (the bench does not:
//! its children are what callboard is measured against).
//!
//! - mimalloc: glibc's malloc and free took about 10% of the API's CPU
//!   under load (docs/PERFORMANCE.md, row 2).
//! - No transparent huge pages (docs/PERFORMANCE.md, row 16, ADR 0015):
//!   with them, mimalloc's arenas were faulted in 2 MiB at a time, and on
//!   this project's VMs zeroing those pages took 43% of the projector's
//!   time in its event batches. mimalloc is built without its
//!   `madvise(MADV_HUGEPAGE)` (the `no_thp` feature), and
//!   [`without_huge_pages`] opts the process out of them where the host
//!   gives them to every mapping (`transparent_hugepage/enabled` set to
//!   `always`).
//!
//! ```ignore
//! #[global_allocator]
//! static GLOBAL: callboard_alloc::Allocator = callboard_alloc::Allocator;
//!
//! fn main() {
//!     let opted_out = callboard_alloc::without_huge_pages();
//!     // ... and warn once logging is set up if it is false.
//! }
//! ```

/// The global allocator of every callboard binary.
pub use mimalloc::MiMalloc as Allocator;

/// Opts this process (all its threads, and the processes it starts) out
/// of transparent huge pages for every fault from now on
/// (`PR_SET_THP_DISABLE`). Call it first in `main`. Returns `false` only
/// when the kernel refused it (an old kernel), which leaves its default:
/// only slower. Other systems have no such pages to opt out of.
#[must_use = "say when the kernel refused: the process then runs with huge pages"]
pub fn without_huge_pages() -> bool {
    #[cfg(target_os = "linux")]
    {
        thp_prctl(libc::PR_SET_THP_DISABLE, 1) == 0
    }
    #[cfg(not(target_os = "linux"))]
    {
        true
    }
}

/// `prctl(option, arg, 0, 0, 0)`: the THP options take one argument and
/// require the other three to be 0.
#[cfg(target_os = "linux")]
fn thp_prctl(option: libc::c_int, arg: libc::c_ulong) -> libc::c_int {
    let zero: libc::c_ulong = 0;
    // SAFETY: the THP options read or set one flag of the process and
    // touch no memory of ours.
    unsafe { libc::prctl(option, arg, zero, zero, zero) }
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use super::*;

    #[test]
    fn the_process_is_opted_out_of_huge_pages() {
        assert!(without_huge_pages(), "the kernel refused PR_SET_THP_DISABLE");
        assert_eq!(thp_prctl(libc::PR_GET_THP_DISABLE, 0), 1);
    }
}
