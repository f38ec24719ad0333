//! Peak resident memory of this process, per sweep cell (Linux only).

/// Resets the kernel's high-water mark of resident memory to the current
/// resident size, so the next [`peak_rss_bytes`] covers what comes after.
/// Does nothing where `/proc/self/clear_refs` is not writable.
pub fn reset_peak_rss() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

/// The process's peak resident memory (`VmHWM`) since start or the last
/// [`reset_peak_rss`]; `None` off Linux.
pub fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|line| line.starts_with("VmHWM:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}
