//! The allocator every callboard binary runs with, and the one
//! process-wide memory setting `callboard` makes (the bench does not:
//! its children are what callboard is measured against).
//!
//! - mimalloc: glibc's malloc and free took about 10% of the API's CPU
//!   under load (docs/PERFORMANCE.md, row 2).
//! - No transparent huge pages (docs/PERFORMANCE.md, row 16, ADR 0015):
//!   with them, mimalloc's arenas were faulted in 2 MiB at a time, and on
//!   this project's VMs the kernel spent more time zeroing those pages than
//!   the projector spent on its work. mimalloc is built without its
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
//!     callboard_alloc::without_huge_pages();
//! }
//! ```

/// The global allocator of every callboard binary.
pub use mimalloc::MiMalloc as Allocator;

/// Opts this process (all its threads, and the processes it starts) out
/// of transparent huge pages for every fault from now on
/// (`PR_SET_THP_DISABLE`). Call it first in `main`. Returns whether the
/// kernel took it: an old kernel or another OS keeps its default, which
/// is only slower.
#[must_use = "say when the kernel refused: the process then runs with huge pages"]
pub fn without_huge_pages() -> bool {
    #[cfg(target_os = "linux")]
    {
        // SAFETY: PR_SET_THP_DISABLE takes one integer and touches no
        // memory of ours.
        unsafe {
            libc::prctl(
                libc::PR_SET_THP_DISABLE,
                1 as libc::c_ulong,
                0 as libc::c_ulong,
                0 as libc::c_ulong,
                0 as libc::c_ulong,
            ) == 0
        }
    }
    #[cfg(not(target_os = "linux"))]
    {
        false
    }
}

/// Whether this process is opted out of transparent huge pages.
pub fn huge_pages_disabled() -> bool {
    #[cfg(target_os = "linux")]
    {
        // SAFETY: PR_GET_THP_DISABLE reads a flag and touches no memory
        // of ours.
        unsafe {
            libc::prctl(
                libc::PR_GET_THP_DISABLE,
                0 as libc::c_ulong,
                0 as libc::c_ulong,
                0 as libc::c_ulong,
                0 as libc::c_ulong,
            ) == 1
        }
    }
    #[cfg(not(target_os = "linux"))]
    {
        false
    }
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use super::*;

    #[test]
    fn the_process_is_opted_out_of_huge_pages() {
        assert!(without_huge_pages(), "the kernel refused PR_SET_THP_DISABLE");
        assert!(huge_pages_disabled());
    }
}
