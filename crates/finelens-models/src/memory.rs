//! Process memory figures the benchmarks report (Linux; `None` elsewhere).

/// Peak resident memory of this process so far (VmHWM), since the start or the last
/// [`reset_peak_rss`].
pub fn peak_rss_bytes() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// Reset the peak to the current resident size (writing 5 to clear_refs, Linux ≥ 4.0).
pub fn reset_peak_rss() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

/// A byte count as "N MiB" for a benchmark line, or "?" where the platform does not say.
pub fn mib(bytes: Option<u64>) -> String {
    bytes.map_or("?".into(), |b| format!("{} MiB", b >> 20))
}
