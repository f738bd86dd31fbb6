//! Allocator settings for the tunnel's binaries, called once at the start of `main`.
//!
//! Packets are received into buffers of 64 KiB and more, handed on as slices of them (no
//! copies), and freed when the last slice is written out. With glibc's default settings a
//! freed block of that size at the top of a thread's heap is given back to the kernel as soon
//! as 128 KiB are free there, so the next read lands in fresh pages: a page fault and a
//! zeroed page for every 4 KiB received. Measured during a 512 MiB upload and download
//! through the tunnel (BENCHMARKS.md, "Page faults"), the broker took 180,000 page faults,
//! the relay 22,000 and the client 15,000; with the settings below, 2,800, 1,700 and 2,300.
//!
//! The settings keep up to [`TRIM_THRESHOLD`] free at the top of each heap, and serve blocks
//! under [`MMAP_THRESHOLD`] from the heaps instead of mapping each of them on its own
//! (mapped blocks are unmapped on free, with the same cost). Other allocators and C
//! libraries keep their own policies: this does nothing there.
//!
//! A program that links the tunnel's libraries chooses its own allocator; it can make the
//! same call.

/// Free bytes kept at the top of a heap before they are given back to the kernel. Setting
/// it also stops glibc from moving the thresholds by itself.
pub const TRIM_THRESHOLD: usize = 16 << 20;

/// Blocks from this size up are mapped on their own (and unmapped on free). Above the
/// largest buffer the tunnel allocates in bulk (HTTP/2 frames of 256 KiB, link and body
/// buffers of a few hundred KiB; 1 MiB was too low for the relay: 39,000 faults).
pub const MMAP_THRESHOLD: usize = 4 << 20;

/// Applies [`TRIM_THRESHOLD`] and [`MMAP_THRESHOLD`] to glibc's allocator. Returns whether
/// they were applied: false on other C libraries, or if glibc refused them.
pub fn keep_freed_memory() -> bool {
    imp::keep_freed_memory()
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
mod imp {
    use super::{MMAP_THRESHOLD, TRIM_THRESHOLD};

    pub(super) fn keep_freed_memory() -> bool {
        // SAFETY: `mallopt` takes two integers and changes the allocator's parameters under
        // its own lock; it is safe to call at any time, from any thread.
        unsafe {
            libc::mallopt(libc::M_TRIM_THRESHOLD, TRIM_THRESHOLD as libc::c_int) == 1
                && libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD as libc::c_int) == 1
        }
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
mod imp {
    pub(super) fn keep_freed_memory() -> bool {
        false
    }
}

#[cfg(test)]
mod tests {
    #[test]
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    fn glibc_takes_the_settings() {
        assert!(super::keep_freed_memory());
    }
}
