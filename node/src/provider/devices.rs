//! The provider's devices: one engine each (a [`Generator`] holding its own copy of the
//! weights) driven by one worker thread. A device whose engine fails (an engine error, out of
//! memory) is down for the rest of the run: its worker exits, the advert leaves it out, and
//! the others keep serving. A restart of the node brings it back.

use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use pixmarket_protocol::{DeviceCapacity, validate};

use super::queue::Speed;
use crate::generator::{CacheStats, Generator, GeneratorInfo};

/// One device and what its worker measured.
pub(super) struct Device {
    pub generator: Arc<dyn Generator>,
    /// The generator's facts, read once at start.
    pub info: GeneratorInfo,
    /// The `device` label of its metrics: its index in the node's device list.
    pub label: String,
    /// Measured time of one standard image on this device (a moving average).
    ms_per_standard: AtomicU64,
    /// Why the device is down; `None` while it serves.
    down: Mutex<Option<String>>,
}

impl Device {
    pub(super) fn ms_per_standard(&self) -> u64 {
        self.ms_per_standard.load(Ordering::Relaxed)
    }

    /// Folds one batch's measured time per standard image into the average, so one odd
    /// batch does not swing the advertised speed.
    pub(super) fn measured(&self, ms_per_standard: u64) {
        let old = self.ms_per_standard();
        let new = old.saturating_mul(3).saturating_add(ms_per_standard.max(1)) / 4;
        self.ms_per_standard.store(new.max(1), Ordering::Relaxed);
    }

    pub(super) fn is_up(&self) -> bool {
        self.down.lock().map(|d| d.is_none()).unwrap_or(false)
    }
}

/// Every device of the node, in the order the operator listed them.
pub(super) struct Devices(Vec<Device>);

impl Devices {
    /// One device per generator, each starting from the estimate `ms_per_standard`.
    pub(super) fn new(generators: Vec<Arc<dyn Generator>>, ms_per_standard: u64) -> Self {
        Self(
            generators
                .into_iter()
                .enumerate()
                .map(|(i, generator)| Device {
                    info: generator.info(),
                    generator,
                    label: i.to_string(),
                    ms_per_standard: AtomicU64::new(ms_per_standard.max(1)),
                    down: Mutex::new(None),
                })
                .collect(),
        )
    }

    pub(super) fn len(&self) -> usize {
        self.0.len()
    }

    pub(super) fn get(&self, i: usize) -> Option<&Device> {
        self.0.get(i)
    }

    pub(super) fn all(&self) -> impl Iterator<Item = &Device> {
        self.0.iter()
    }

    /// The devices serving now.
    /// The caching counters of every device's engine, summed (each keeps its own caches).
    pub(super) fn cache_stats(&self) -> CacheStats {
        self.all()
            .map(|d| d.generator.cache_stats())
            .fold(CacheStats::default(), |a, b| CacheStats {
                prompt_hits: a.prompt_hits.saturating_add(b.prompt_hits),
                prompt_misses: a.prompt_misses.saturating_add(b.prompt_misses),
                full_forwards: a.full_forwards.saturating_add(b.full_forwards),
                reused_forwards: a.reused_forwards.saturating_add(b.reused_forwards),
            })
    }

    /// The largest image side every serving device's memory plan allows: any of them may
    /// run a job, so the smallest plan bounds what the node accepts.
    pub(super) fn max_side(&self) -> u32 {
        self.up()
            .map(|d| d.generator.max_side())
            .min()
            .unwrap_or(pixmarket_protocol::validate::MAX_DIMENSION)
    }

    /// Images at `width`×`height` every serving device's memory plan runs in one batch (the
    /// smallest plan bounds the node, as for [`Self::max_side`]).
    pub(super) fn max_images(&self, width: u32, height: u32) -> u32 {
        self.up()
            .map(|d| d.generator.max_images(width, height))
            .min()
            .unwrap_or(u32::MAX)
    }

    pub(super) fn up(&self) -> impl Iterator<Item = &Device> {
        self.0.iter().filter(|d| d.is_up())
    }

    /// The first device serving now: its generator counts prompt tokens and says which modes
    /// the node runs (every device loads the same model).
    pub(super) fn first_up(&self) -> Option<&Device> {
        self.up().next()
    }

    /// Marks device `i` down with the reason; true if it was up until now.
    pub(super) fn mark_down(&self, i: usize, why: &str) -> bool {
        let Some(d) = self.0.get(i) else {
            return false;
        };
        match d.down.lock() {
            Ok(mut down) if down.is_none() => {
                *down = Some(why.to_owned());
                true
            }
            _ => false,
        }
    }

    /// The queue's view of the devices serving now (one at least, so estimates stay finite
    /// while the last one fails).
    pub(super) fn speed(&self) -> Speed {
        let (n, sum) = self.up().fold((0u64, 0u64), |(n, s), d| {
            (n + 1, s.saturating_add(d.ms_per_standard()))
        });
        Speed {
            devices: usize::try_from(n).unwrap_or(usize::MAX).max(1),
            ms_per_standard: sum
                .checked_div(n)
                .unwrap_or_else(|| self.0.first().map_or(1, Device::ms_per_standard)),
        }
    }

    /// The serving devices as the advert lists them.
    pub(super) fn advertised(&self) -> Vec<DeviceCapacity> {
        self.up()
            .take(validate::MAX_ADVERT_DEVICES)
            .map(|d| DeviceCapacity {
                name: if d.info.device_name.trim().is_empty() {
                    format!("device {}", d.label)
                } else {
                    d.info
                        .device_name
                        .chars()
                        .take(validate::MAX_DEVICE_NAME_CHARS)
                        .collect()
                },
                memory_mib: d.info.device_memory_mib,
                ms_per_standard_image: d.ms_per_standard(),
            })
            .collect()
    }
}
