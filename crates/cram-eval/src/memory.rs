//! Memory of this process: peak resident memory per sweep cell (Linux
//! only), how the allocator of cram's binaries keeps freed memory, and GPU
//! memory as the CUDA driver counts it.

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

/// GPU memory of a CUDA device, MiB, from the driver.
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct DeviceMemory {
    /// Held by live tensors now (the stream-ordered pool's used bytes;
    /// candle allocates every tensor from that pool).
    pub in_use_mib: f64,
    /// The most held by live tensors since the last [`reset_device_peak`].
    pub peak_mib: f64,
    /// In use on the whole device by every context (cuMemGetInfo): the
    /// pool's cached blocks, cuBLAS's workspace, the CUDA context itself.
    pub device_used_mib: f64,
    pub device_total_mib: f64,
}

/// The driver's figures for `device`; `None` on a CPU, or a build without CUDA.
pub fn device_memory(device: &candle_core::Device) -> Option<DeviceMemory> {
    #[cfg(feature = "cuda")]
    if let candle_core::Device::Cuda(cuda) = device {
        return cuda_pool::read(cuda).map_err(|e| tracing::warn!("reading GPU memory: {e}")).ok();
    }
    let _ = device;
    None
}

/// Starts a new peak for [`DeviceMemory::peak_mib`] at what is in use now.
pub fn reset_device_peak(device: &candle_core::Device) {
    #[cfg(feature = "cuda")]
    if let candle_core::Device::Cuda(cuda) = device {
        if let Err(e) = cuda_pool::reset_peak(cuda) {
            tracing::warn!("resetting the GPU memory peak: {e}");
        }
    }
    let _ = device;
}

/// The device's default memory pool, which cudarc's stream-ordered
/// allocations (and so candle's tensors) come from; its attributes count
/// used bytes and their high-water mark.
#[cfg(feature = "cuda")]
mod cuda_pool {
    use candle_core::cuda_backend::cudarc::driver::{result, sys, DriverError};
    use candle_core::CudaDevice;

    use super::DeviceMemory;

    const MIB: f64 = 1024.0 * 1024.0;

    fn pool(device: &CudaDevice) -> Result<sys::CUmemoryPool, DriverError> {
        let stream = device.cuda_stream();
        let context = stream.context();
        context.bind_to_thread()?;
        // SAFETY: the device handle comes from a live context.
        unsafe { result::device::get_default_mem_pool(context.cu_device()) }
    }

    fn attribute(pool: sys::CUmemoryPool, attribute: sys::CUmemPool_attribute) -> Result<u64, DriverError> {
        let mut value: u64 = 0;
        // SAFETY: the used-memory attributes are 64-bit integers.
        unsafe { result::mem_pool::get_attribute(pool, attribute, (&mut value as *mut u64).cast()) }?;
        Ok(value)
    }

    pub(super) fn read(device: &CudaDevice) -> Result<DeviceMemory, DriverError> {
        use sys::CUmemPool_attribute::{CU_MEMPOOL_ATTR_USED_MEM_CURRENT, CU_MEMPOOL_ATTR_USED_MEM_HIGH};
        // Pending work must have allocated what it will before we count.
        device.cuda_stream().synchronize()?;
        let pool = pool(device)?;
        let (free, total) = device.cuda_stream().context().mem_get_info()?;
        Ok(DeviceMemory {
            in_use_mib: attribute(pool, CU_MEMPOOL_ATTR_USED_MEM_CURRENT)? as f64 / MIB,
            peak_mib: attribute(pool, CU_MEMPOOL_ATTR_USED_MEM_HIGH)? as f64 / MIB,
            device_used_mib: (total - free) as f64 / MIB,
            device_total_mib: total as f64 / MIB,
        })
    }

    pub(super) fn reset_peak(device: &CudaDevice) -> Result<(), DriverError> {
        device.cuda_stream().synchronize()?;
        let pool = pool(device)?;
        // The driver accepts only zero here, which resets the mark to the current use.
        let mut zero: u64 = 0;
        // SAFETY: USED_MEM_HIGH is a 64-bit integer attribute.
        unsafe { result::mem_pool::set_attribute(pool, sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_HIGH, (&mut zero as *mut u64).cast()) }
    }
}

/// mimalloc's `mi_option_purge_delay` (mimalloc.h; libmimalloc-sys names no
/// constant for it). The test below checks it against the option's default.
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// Milliseconds a freed block stays mapped before mimalloc gives its pages
/// back to the kernel; -1 is never.
pub const PURGE_DELAY_MS: i64 = -1;

/// Makes mimalloc keep freed memory mapped instead of purging it after a
/// second (mimalloc v3's default), unless `MIMALLOC_PURGE_DELAY` is set
/// (then that wins).
///
/// Why: candle allocates a fresh buffer for every op's output, and an
/// optimization step frees and reallocates the same large activations each
/// step. A step over a long span takes seconds, so a buffer freed in one
/// step's backward sits unused for more than the default second before the
/// next step wants it, and is purged. Its pages then come back through page
/// faults that the kernel zeroes: on T24 at 3.2x that cost 29% of a step
/// (experiments/speed/README.md).
/// The cost is resident memory that stays at the step's high-water mark.
/// Only matters in a process whose global allocator is mimalloc (the `cram`
/// binary, the benches); elsewhere it sets an option nothing reads.
pub fn keep_freed_memory() {
    if std::env::var_os("MIMALLOC_PURGE_DELAY").is_none() {
        // SAFETY: sets one of mimalloc's global integer options; any value is valid.
        unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, PURGE_DELAY_MS as _) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn purge_delay() -> i64 {
        // SAFETY: reads one of mimalloc's global integer options.
        unsafe { libmimalloc_sys::mi_option_get(MI_OPTION_PURGE_DELAY) as i64 }
    }

    /// With `MIMALLOC_PURGE_DELAY` set, the user's value must survive
    /// (checked, not skipped); without it, ours must replace mimalloc's default.
    #[test]
    fn keep_freed_memory_sets_mimallocs_purge_delay_unless_the_user_did() {
        if let Ok(user) = std::env::var("MIMALLOC_PURGE_DELAY") {
            let before = purge_delay();
            keep_freed_memory();
            assert_eq!(purge_delay(), before, "MIMALLOC_PURGE_DELAY={user} is the user's and must win");
            return;
        }
        // mimalloc v3's default purge_delay is 1,000 ms (options.c); another
        // option at index 15, or another mimalloc, would not read that here.
        assert_eq!(purge_delay(), 1000, "index {MI_OPTION_PURGE_DELAY} is not mimalloc v3's purge_delay");
        keep_freed_memory();
        assert_eq!(purge_delay(), PURGE_DELAY_MS);
    }
}
