//! Node metrics in the Prometheus text format: jobs by outcome, queue length, per device (a
//! `device` label, its index in the node's device list) busy time, step time, memory and
//! whether it serves; tokens earned and spent, peers; plus libp2p's own metrics, registered by the
//! network. Served by a minimal HTTP endpoint (`GET /metrics`) with a bounded number of
//! concurrent connections. The same figures are kept as plain [`Totals`] for the API's
//! dashboard routes, which read them through [`Metrics::totals`].

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use pixmarket_protocol::MicroTokens;

use crate::generator::CacheStats;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::Semaphore;

/// Scrapers are few; more concurrent connections than this wait.
const MAX_METRICS_CONNECTIONS: usize = 8;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Outcome {
    outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DeviceLabel {
    device: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DeviceInfoLabels {
    device: String,
    name: String,
}

/// 10 ms .. ~40 s: a tiny-model step on a CPU up to a 2048² step on a small GPU.
fn step_histogram() -> Histogram {
    Histogram::new(prometheus_client::metrics::histogram::exponential_buckets(
        0.01, 2.0, 13,
    ))
}

/// One device's figures since the node started, as the dashboard reads them.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DeviceTotals {
    /// The device's name as its engine reports it.
    pub name: String,
    /// Its memory as its engine reports it (0: not known).
    pub memory_mib: u64,
    /// Whether it serves (false once its engine failed).
    pub up: bool,
    /// Time its generator spent running batches.
    pub busy_ms: u64,
    /// Denoising steps run, and their summed wall time.
    pub steps: u64,
    pub step_us_total: u64,
    /// The wall time of the last step.
    pub last_step_us: Option<u64>,
}

/// The node's figures since it started, as plain values. Its maps are bounded: the outcomes
/// are the fixed names the node counts, and the devices at most
/// [`crate::provider::MAX_DEVICES`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Totals {
    /// Jobs by outcome, as the `pixmarket_jobs` counter.
    pub jobs: BTreeMap<String, u64>,
    /// Jobs waiting for a device now.
    pub queue: usize,
    /// By the device's label (its index in the node's device list).
    pub devices: BTreeMap<String, DeviceTotals>,
}

/// The node's own metrics.
#[derive(Debug)]
pub struct Metrics {
    jobs: Family<Outcome, Counter>,
    queue: Gauge,
    busy_ms: Family<DeviceLabel, Counter>,
    step_seconds: Family<DeviceLabel, Histogram, fn() -> Histogram>,
    memory_mib: Family<DeviceInfoLabels, Gauge>,
    device_up: Family<DeviceLabel, Gauge>,
    earned_micro: Counter,
    spent_micro: Counter,
    peers: Gauge,
    prompt_cache: Family<Outcome, Counter>,
    forwards: Family<Outcome, Counter>,
    /// The generator's totals at the last [`Metrics::cache`] call, so counters get deltas.
    cache_seen: std::sync::Mutex<CacheStats>,
    totals: std::sync::Mutex<Totals>,
}

impl Metrics {
    pub fn new(registry: &mut Registry) -> Self {
        let m = Self {
            jobs: Family::default(),
            queue: Gauge::default(),
            busy_ms: Family::default(),
            step_seconds: Family::new_with_constructor(step_histogram),
            memory_mib: Family::default(),
            device_up: Family::default(),
            earned_micro: Counter::default(),
            spent_micro: Counter::default(),
            peers: Gauge::default(),
            prompt_cache: Family::default(),
            forwards: Family::default(),
            cache_seen: std::sync::Mutex::new(CacheStats::default()),
            totals: std::sync::Mutex::new(Totals::default()),
        };
        let r = registry.sub_registry_with_prefix("pixmarket");
        r.register(
            "jobs",
            "Jobs by outcome (accepted, refused, completed, failed, cancelled, paid)",
            m.jobs.clone(),
        );
        r.register("queue_length", "Jobs waiting for the GPU", m.queue.clone());
        r.register(
            "gpu_busy_milliseconds",
            "Time each device's generator spent running batches; rate() is its busy fraction",
            m.busy_ms.clone(),
        );
        r.register(
            "step_seconds",
            "Wall time of one denoising step, per device",
            m.step_seconds.clone(),
        );
        r.register(
            "device_memory_mib",
            "Memory of each device as its engine reports it (0: not known), with its name",
            m.memory_mib.clone(),
        );
        r.register(
            "device_up",
            "1 while a device serves, 0 once its engine failed",
            m.device_up.clone(),
        );
        r.register(
            "earned_microtokens",
            "Micro-tokens charged to requesters",
            m.earned_micro.clone(),
        );
        r.register(
            "spent_microtokens",
            "Micro-tokens paid to providers",
            m.spent_micro.clone(),
        );
        r.register("peers", "Connected peers", m.peers.clone());
        r.register(
            "prompt_cache",
            "Prompt-embedding cache lookups by outcome (hit, miss)",
            m.prompt_cache.clone(),
        );
        r.register(
            "transformer_forwards",
            "Transformer row-forwards by kind (full, reused: step caching ran only the first block)",
            m.forwards.clone(),
        );
        m
    }

    /// Adds what the generator's caches did since the last call (`totals` only grow).
    pub fn cache(&self, totals: CacheStats) {
        let Ok(mut seen) = self.cache_seen.lock() else {
            return;
        };
        let add = |family: &Family<Outcome, Counter>, outcome: &str, now: u64, then: u64| {
            family
                .get_or_create(&Outcome {
                    outcome: outcome.to_owned(),
                })
                .inc_by(now.saturating_sub(then));
        };
        add(
            &self.prompt_cache,
            "hit",
            totals.prompt_hits,
            seen.prompt_hits,
        );
        add(
            &self.prompt_cache,
            "miss",
            totals.prompt_misses,
            seen.prompt_misses,
        );
        add(
            &self.forwards,
            "full",
            totals.full_forwards,
            seen.full_forwards,
        );
        add(
            &self.forwards,
            "reused",
            totals.reused_forwards,
            seen.reused_forwards,
        );
        *seen = totals;
    }

    /// The figures since the node started.
    pub fn totals(&self) -> Totals {
        self.totals.lock().map(|t| t.clone()).unwrap_or_default()
    }

    fn update(&self, f: impl FnOnce(&mut Totals)) {
        if let Ok(mut t) = self.totals.lock() {
            f(&mut t);
        }
    }

    fn device_totals<'a>(t: &'a mut Totals, device: &str) -> &'a mut DeviceTotals {
        t.devices.entry(device.to_owned()).or_default()
    }

    pub fn job(&self, outcome: &str) {
        self.jobs
            .get_or_create(&Outcome {
                outcome: outcome.to_owned(),
            })
            .inc();
        self.update(|t| *t.jobs.entry(outcome.to_owned()).or_default() += 1);
    }
    pub fn set_queue(&self, n: usize) {
        self.queue.set(i64::try_from(n).unwrap_or(i64::MAX));
        self.update(|t| t.queue = n);
    }
    pub fn busy(&self, device: &str, d: Duration) {
        let ms = u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
        self.busy_ms
            .get_or_create(&DeviceLabel {
                device: device.to_owned(),
            })
            .inc_by(ms);
        self.update(|t| {
            let dev = Self::device_totals(t, device);
            dev.busy_ms = dev.busy_ms.saturating_add(ms);
        });
    }
    pub fn step(&self, device: &str, d: Duration) {
        self.step_seconds
            .get_or_create(&DeviceLabel {
                device: device.to_owned(),
            })
            .observe(d.as_secs_f64());
        let us = u64::try_from(d.as_micros()).unwrap_or(u64::MAX);
        self.update(|t| {
            let dev = Self::device_totals(t, device);
            dev.steps = dev.steps.saturating_add(1);
            dev.step_us_total = dev.step_us_total.saturating_add(us);
            dev.last_step_us = Some(us);
        });
    }
    /// A device's engine is loaded and its worker starts.
    pub fn device_started(&self, device: &str, info: &crate::generator::GeneratorInfo) {
        let label = DeviceLabel {
            device: device.to_owned(),
        };
        self.memory_mib
            .get_or_create(&DeviceInfoLabels {
                device: device.to_owned(),
                name: info.device_name.clone(),
            })
            .set(i64::try_from(info.device_memory_mib).unwrap_or(i64::MAX));
        self.device_up.get_or_create(&label).set(1);
        // Present from the start, so rate() over a device that never ran is 0, not missing.
        let _ = self.busy_ms.get_or_create(&label);
        self.update(|t| {
            let dev = Self::device_totals(t, device);
            dev.name.clone_from(&info.device_name);
            dev.memory_mib = info.device_memory_mib;
            dev.up = true;
        });
    }
    /// A device's engine failed; its worker serves no more.
    pub fn device_down(&self, device: &str) {
        self.device_up
            .get_or_create(&DeviceLabel {
                device: device.to_owned(),
            })
            .set(0);
        self.update(|t| Self::device_totals(t, device).up = false);
    }
    pub fn earned(&self, amount: MicroTokens) {
        self.earned_micro.inc_by(amount.0);
    }
    pub fn spent(&self, amount: MicroTokens) {
        self.spent_micro.inc_by(amount.0);
    }
    pub fn set_peers(&self, n: usize) {
        self.peers.set(i64::try_from(n).unwrap_or(i64::MAX));
    }
}

/// Serves `GET /metrics` on `listener` until the task is dropped.
pub async fn serve(listener: tokio::net::TcpListener, registry: Arc<std::sync::Mutex<Registry>>) {
    let permits = Arc::new(Semaphore::new(MAX_METRICS_CONNECTIONS));
    loop {
        let Ok(permit) = permits.clone().acquire_owned().await else {
            return;
        };
        let Ok((mut stream, _)) = listener.accept().await else {
            continue;
        };
        let registry = registry.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let mut buf = [0u8; 1024];
            // One read of the request line is enough: we answer the same page to any GET.
            let n = match tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buf)).await
            {
                Ok(Ok(n)) => n,
                _ => return,
            };
            let (status, body) = if buf[..n].starts_with(b"GET /metrics") {
                let mut text = String::new();
                let encoded = registry
                    .lock()
                    .map_err(|_| std::fmt::Error)
                    .and_then(|r| prometheus_client::encoding::text::encode(&mut text, &r));
                match encoded {
                    Ok(()) => ("200 OK", text),
                    Err(_) => ("500 Internal Server Error", String::new()),
                }
            } else {
                ("404 Not Found", "try GET /metrics\n".to_owned())
            };
            let head = format!(
                "HTTP/1.1 {status}\r\ncontent-type: text/plain; version=0.0.4\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
                body.len()
            );
            let _ = stream.write_all(head.as_bytes()).await;
            let _ = stream.write_all(body.as_bytes()).await;
        });
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn totals_follow_the_counters() {
        let mut registry = Registry::default();
        let m = Metrics::new(&mut registry);
        m.job("completed");
        m.job("completed");
        m.job("refused");
        m.set_queue(3);
        m.busy("0", Duration::from_millis(250));
        m.busy("0", Duration::from_millis(50));
        m.step("0", Duration::from_micros(1500));
        m.step("0", Duration::from_micros(500));
        m.device_down("1");
        let t = m.totals();
        assert_eq!(t.jobs["completed"], 2);
        assert_eq!(t.jobs["refused"], 1);
        assert_eq!(t.queue, 3);
        let d0 = &t.devices["0"];
        assert_eq!((d0.busy_ms, d0.steps, d0.step_us_total), (300, 2, 2000));
        assert_eq!(d0.last_step_us, Some(500));
        assert!(!t.devices["1"].up);
    }

    #[test]
    fn cache_counters_follow_the_generator_s_totals() {
        let mut registry = Registry::default();
        let m = Metrics::new(&mut registry);
        let totals = |prompt_hits, prompt_misses, full_forwards, reused_forwards| CacheStats {
            prompt_hits,
            prompt_misses,
            full_forwards,
            reused_forwards,
        };
        m.cache(totals(1, 2, 10, 0));
        m.cache(totals(4, 2, 16, 3));
        // A total that went down (a replaced generator) adds nothing rather than wrapping.
        m.cache(totals(4, 1, 16, 3));
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        for line in [
            "pixmarket_prompt_cache_total{outcome=\"hit\"} 4",
            "pixmarket_prompt_cache_total{outcome=\"miss\"} 2",
            "pixmarket_transformer_forwards_total{outcome=\"full\"} 16",
            "pixmarket_transformer_forwards_total{outcome=\"reused\"} 3",
        ] {
            assert!(text.contains(line), "{line} missing from:\n{text}");
        }
    }
}
