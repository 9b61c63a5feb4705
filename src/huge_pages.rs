//! Transparent huge pages, turned off for the whole process.
//!
//! mimalloc asks the kernel for huge pages on the memory it maps (`madvise`), and on
//! Linux each first touch of one then clears 2 MiB at once. In a profile of `run`
//! saturated, clearing pages took 12% of the CPU with huge pages and 1% without. The
//! processors bench gained less than that suggests, as the kernel then faults in more
//! small pages (`cargo bench --bench processors`, 400,000 requests, AMD EPYC, 2 cores:
//! 44,800 requests/s against 43,150, the mean of six runs each way, whose ranges overlap).
//!
//! It owns only that switch; it must not read configuration.

/// Turns transparent huge pages off for this process and its children
/// (`PR_SET_THP_DISABLE`), before anything has touched much memory. Elsewhere than on
/// Linux, and where the kernel refuses, nothing changes: this is a matter of speed only.
pub fn turn_off() {
    #[cfg(target_os = "linux")]
    if let Err(e) = rustix::thread::disable_transparent_huge_pages(true) {
        tracing::debug!("transparent huge pages stay on: {e}");
    }
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    #[test]
    fn huge_pages_are_off_once_turned_off() {
        super::turn_off();
        assert!(rustix::thread::transparent_huge_pages_are_disabled().unwrap());
    }
}
