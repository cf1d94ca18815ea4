//! How much memory a device has, for the provider's advert and metrics.

use candle_core::Device;

/// Total memory of `device` in MiB: the card's for a CUDA device (as the driver reports it),
/// `None` for the processor (its memory is the machine's, not the device's) and for builds
/// without CUDA.
pub fn total_mib(device: &Device) -> Option<u64> {
    match device {
        #[cfg(feature = "cuda")]
        Device::Cuda(d) => {
            let (_free, total) = d.cuda_stream().context().mem_get_info().ok()?;
            u64::try_from(total / (1024 * 1024)).ok()
        }
        _ => None,
    }
}
