//! The plan of a testnet run: which requester submits which job when, and which faults strike
//! when. A plan is a pure function of the configuration and `--seed` (a ChaCha8 stream), and
//! its blake3 hash goes into every report, so two runs with one seed provably ran one plan.
//! What is not fixed by the seed is the machine: wall-clock timings, and so which provider a
//! job lands on when queues are close.
//!
//! Loads:
//! - `steady`: Poisson arrivals at a fixed rate.
//! - `daily`: a working day's curve (quiet nights, a morning and an afternoon peak) with a few
//!   short bursts at twice the peak rate, sampled as a non-homogeneous Poisson process.
//! - a trace file: JSON lines `{"at_s": 12.5, "requester": 0, "width": 1024, "height": 1024,
//!   "steps": 30, "images": 1, "cfg": 4.0, "prompt": "..."}` (every field but `at_s` optional),
//!   replayed as written.

use std::io::BufRead;
use std::path::{Path, PathBuf};

use pixmarket_protocol::{Hash, JobParams, Mode};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::sim::{as_f64, to_ms};

/// Prompts the planned jobs use, Chinese included.
pub const PROMPTS: [&str; 8] = [
    "a lighthouse on a cliff at dusk, oil painting",
    "一只在雪地里的红狐狸，水墨画",
    "isometric pixel-art coffee shop, warm light",
    "a paper boat on a rainy street, macro photo",
    "海报：春节灯笼和舞龙，红色主题，中文标题“新年快乐”",
    "product shot of a ceramic teapot on linen, soft daylight",
    "a cyberpunk alley with neon signs in Chinese and English",
    "watercolor map of an imaginary island with a compass rose",
];

/// How jobs arrive.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Load {
    /// Poisson arrivals, this many jobs per model-time minute.
    Steady { per_minute: f64 },
    /// The daily curve, peaking at this many jobs per model-time minute. With `zones` > 1
    /// the requesters are spread over that many time zones, evenly apart: each zone's curve
    /// peaks at `peak_per_minute / zones`, shifted by `24 h / zones` from the last.
    Daily { peak_per_minute: f64, zones: u32 },
    /// Jobs replayed from a JSON-lines file.
    Trace { path: PathBuf },
}

/// Which sizes the planned jobs ask for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum JobMix {
    /// Small jobs the tiny engine runs on a CPU in well under a second: 256², 2–4 steps.
    Tiny,
    /// What designers ask of the real model: 512² to 1328², 20–50 steps, 1–4 images, true CFG.
    Production,
}

/// Faults to inject.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct FaultSpec {
    /// Providers killed mid-run (abruptly) and restarted from their data folder.
    pub kills: u32,
    /// Probability that an RPC message is lost, in parts per million.
    pub drop_ppm: u32,
    /// Probability that a message carrying a receipt acknowledgement is lost, in parts per
    /// million, on top of `drop_ppm`.
    #[serde(default)]
    pub ack_drop_ppm: u32,
    /// Each RPC message is held this long, drawn uniformly (model-time ms, applied as wall).
    pub delay_ms: Option<(u64, u64)>,
    /// Split the network in two halves for the middle fifth of the run.
    pub partition: bool,
}

/// One planned job.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PlannedJob {
    pub index: usize,
    pub at_ms: u64,
    pub requester: usize,
    pub params: JobParams,
}

/// One planned fault, at a model time.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum PlannedFault {
    /// Kill provider `provider` at `at_ms`, restart it `down_ms` later.
    Kill {
        at_ms: u64,
        provider: usize,
        down_ms: u64,
    },
    /// From `at_ms` to `until_ms`, providers `0..split` and requesters of even index can't
    /// reach the rest.
    Partition {
        at_ms: u64,
        until_ms: u64,
        split: usize,
    },
}

/// The whole plan.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Plan {
    pub seed: u64,
    pub duration_ms: u64,
    pub jobs: Vec<PlannedJob>,
    pub faults: Vec<PlannedFault>,
    pub drop_ppm: u32,
    #[serde(default)]
    pub ack_drop_ppm: u32,
    pub delay_ms: Option<(u64, u64)>,
    pub adversaries: Vec<String>,
}

impl Plan {
    /// blake3 of the plan's JSON, hex.
    pub fn hash(&self) -> String {
        let json = serde_json::to_vec(self).unwrap_or_default();
        Hash::of(&json).to_string()
    }
}

/// What a plan is made from.
#[derive(Clone, Debug)]
pub struct PlanSpec {
    pub seed: u64,
    pub load: Load,
    pub mix: JobMix,
    pub duration_ms: u64,
    pub requesters: usize,
    pub providers: usize,
    pub faults: FaultSpec,
    pub adversaries: Vec<String>,
}

/// A plan problem, naming what is wrong and what is allowed.
#[derive(Debug, thiserror::Error)]
pub enum PlanError {
    #[error("cannot read the trace {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} line {line}: {problem}")]
    Trace {
        path: PathBuf,
        line: usize,
        problem: String,
    },
    #[error("{0}")]
    Invalid(String),
}

/// The daily curve's relative rate for each hour (peak = 1.0), and the model's day.
const HOURLY: [f64; 24] = [
    0.06, 0.04, 0.03, 0.03, 0.04, 0.06, 0.12, 0.25, 0.50, 0.78, 0.95, 1.00, 0.85, 0.80, 0.92, 0.97,
    0.88, 0.70, 0.50, 0.38, 0.30, 0.22, 0.14, 0.09,
];
pub const DAY_MS: u64 = 24 * 60 * 60 * 1000;
/// Bursts per day, each lasting this long at twice the peak rate on top of the curve.
const BURSTS_PER_DAY: u32 = 3;
const BURST_MS: u64 = 15 * 60 * 1000;

/// The daily curve at model time `t_ms` (relative to the peak), bursts not included.
pub fn daily_shape(t_ms: u64) -> f64 {
    let hours = as_f64(t_ms % DAY_MS) / 3_600_000.0;
    let h = hours.floor();
    let frac = hours - h;
    let i = usize::try_from(to_ms(h)).unwrap_or(0) % 24;
    HOURLY[i] * (1.0 - frac) + HOURLY[(i + 1) % 24] * frac
}

/// The mean of [`daily_shape`] over a day (bursts excluded): the peak-to-mean ratio is its
/// inverse.
pub fn daily_mean() -> f64 {
    HOURLY.iter().sum::<f64>() / 24.0
}

fn exp_sample(rng: &mut ChaCha8Rng, rate_per_ms: f64) -> f64 {
    // Inverse transform; `gen` is in [0, 1), so 1 - u is in (0, 1].
    let u: f64 = rng.r#gen();
    -(1.0 - u).ln() / rate_per_ms
}

fn random_params(rng: &mut ChaCha8Rng, mix: JobMix, index: usize) -> JobParams {
    let prompt = PROMPTS[rng.gen_range(0..PROMPTS.len())];
    let (width, height, steps, images, cfg) = match mix {
        JobMix::Tiny => (256, 256, rng.gen_range(2..=4), 1, 1.0),
        JobMix::Production => {
            const SIZES: [(u32, u32); 5] = [
                (1024, 1024),
                (1328, 1328),
                (1024, 768),
                (768, 1024),
                (512, 512),
            ];
            const STEPS: [u32; 4] = [20, 30, 40, 50];
            const IMAGES: [u32; 6] = [1, 1, 1, 2, 2, 4];
            let (w, h) = SIZES[rng.gen_range(0..SIZES.len())];
            let cfg = if rng.gen_bool(0.8) { 4.0 } else { 1.0 };
            (
                w,
                h,
                STEPS[rng.gen_range(0..STEPS.len())],
                IMAGES[rng.gen_range(0..IMAGES.len())],
                cfg,
            )
        }
    };
    JobParams {
        prompt: prompt.into(),
        negative_prompt: String::new(),
        width,
        height,
        steps,
        true_cfg_scale: cfg,
        seed: u64::try_from(index).unwrap_or(0),
        images,
        mode: Mode::TextToImage,
        exact: false,
        lora: None,
        latents: None,
    }
}

/// Arrival times (model ms) for a rate function, by thinning a Poisson process at `max_rate`.
fn arrivals(
    rng: &mut ChaCha8Rng,
    duration_ms: u64,
    max_rate_per_min: f64,
    rate: impl Fn(u64) -> f64,
) -> Vec<u64> {
    let mut out = Vec::new();
    if max_rate_per_min <= 0.0 || !max_rate_per_min.is_finite() {
        return out;
    }
    let per_ms = max_rate_per_min / 60_000.0;
    let mut t = 0.0;
    loop {
        t += exp_sample(rng, per_ms);
        let at = to_ms(t);
        if at >= duration_ms {
            return out;
        }
        let accept: f64 = rng.r#gen();
        if accept * max_rate_per_min < rate(at) {
            out.push(at);
        }
    }
}

/// Builds the plan for `spec`.
pub fn plan(spec: &PlanSpec) -> Result<Plan, PlanError> {
    if spec.requesters == 0 {
        return Err(PlanError::Invalid(
            "a testnet needs at least one requester".into(),
        ));
    }
    let mut rng = ChaCha8Rng::seed_from_u64(spec.seed);
    let mut jobs = Vec::new();
    match &spec.load {
        Load::Steady { per_minute } => {
            check_rate(*per_minute)?;
            for at in arrivals(&mut rng, spec.duration_ms, *per_minute, |_| *per_minute) {
                push_job(&mut jobs, &mut rng, spec, at);
            }
        }
        Load::Daily {
            peak_per_minute,
            zones,
        } => {
            check_rate(*peak_per_minute)?;
            let zones = *zones;
            if zones == 0 || usize::try_from(zones).unwrap_or(usize::MAX) > spec.requesters {
                return Err(PlanError::Invalid(format!(
                    "{zones} time zones: allowed is 1 to the number of requesters ({})",
                    spec.requesters
                )));
            }
            let days = spec.duration_ms.div_ceil(DAY_MS).max(1);
            let peak = *peak_per_minute / f64::from(zones);
            let mut timed = Vec::new();
            for zone in 0..zones {
                let shift = DAY_MS / u64::from(zones) * u64::from(zone);
                let bursts: Vec<u64> = (0..days * u64::from(BURSTS_PER_DAY))
                    .map(|i| {
                        // Bursts fall in working hours (8:00–18:00) of the zone's day.
                        let day = i / u64::from(BURSTS_PER_DAY);
                        day * DAY_MS + rng.gen_range(8 * 3_600_000..18 * 3_600_000)
                    })
                    .collect();
                let rate = |t: u64| {
                    let local = t + shift;
                    let burst = bursts
                        .iter()
                        .any(|b| (*b..b + BURST_MS).contains(&(local % (days * DAY_MS))));
                    peak * (daily_shape(local) + if burst { 2.0 } else { 0.0 })
                };
                for at in arrivals(&mut rng, spec.duration_ms, peak * 3.0, rate) {
                    timed.push((at, zone));
                }
            }
            timed.sort_unstable();
            for (at, zone) in timed {
                push_job_in_zone(&mut jobs, &mut rng, spec, at, zone, zones);
            }
        }
        Load::Trace { path } => {
            for (at, requester, params) in read_trace(path, spec.requesters)? {
                let index = jobs.len();
                jobs.push(PlannedJob {
                    index,
                    at_ms: at,
                    requester,
                    params,
                });
            }
        }
    }
    let mut faults = Vec::new();
    for _ in 0..spec.faults.kills {
        if spec.providers < 2 {
            return Err(PlanError::Invalid(
                "killing a provider needs at least 2 providers, so the market keeps one".into(),
            ));
        }
        faults.push(PlannedFault::Kill {
            at_ms: rng.gen_range(spec.duration_ms / 10..=spec.duration_ms / 2),
            provider: rng.gen_range(0..spec.providers),
            down_ms: spec.duration_ms / 10,
        });
    }
    if spec.faults.partition {
        if spec.providers < 2 {
            return Err(PlanError::Invalid(
                "a partition needs at least 2 providers".into(),
            ));
        }
        faults.push(PlannedFault::Partition {
            at_ms: spec.duration_ms * 2 / 5,
            until_ms: spec.duration_ms * 3 / 5,
            split: spec.providers / 2,
        });
    }
    Ok(Plan {
        seed: spec.seed,
        duration_ms: spec.duration_ms,
        jobs,
        faults,
        drop_ppm: spec.faults.drop_ppm,
        ack_drop_ppm: spec.faults.ack_drop_ppm,
        delay_ms: spec.faults.delay_ms,
        adversaries: spec.adversaries.clone(),
    })
}

fn check_rate(r: f64) -> Result<(), PlanError> {
    if r.is_finite() && r > 0.0 && r <= 100_000.0 {
        Ok(())
    } else {
        Err(PlanError::Invalid(format!(
            "job rate {r} per minute: allowed is more than 0 and at most 100000"
        )))
    }
}

fn push_job(jobs: &mut Vec<PlannedJob>, rng: &mut ChaCha8Rng, spec: &PlanSpec, at: u64) {
    push_job_in_zone(jobs, rng, spec, at, 0, 1);
}

/// A job from a requester of `zone` (the requesters `r` with `r % zones == zone`).
fn push_job_in_zone(
    jobs: &mut Vec<PlannedJob>,
    rng: &mut ChaCha8Rng,
    spec: &PlanSpec,
    at: u64,
    zone: u32,
    zones: u32,
) {
    let index = jobs.len();
    let zones = usize::try_from(zones).unwrap_or(1).max(1);
    let zone = usize::try_from(zone).unwrap_or(0);
    let in_zone = spec.requesters.saturating_sub(zone).div_ceil(zones).max(1);
    let requester = (zone + zones * rng.gen_range(0..in_zone)).min(spec.requesters - 1);
    let params = random_params(rng, spec.mix, index);
    jobs.push(PlannedJob {
        index,
        at_ms: at,
        requester,
        params,
    });
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TraceLine {
    at_s: f64,
    requester: Option<usize>,
    width: Option<u32>,
    height: Option<u32>,
    steps: Option<u32>,
    images: Option<u32>,
    cfg: Option<f32>,
    prompt: Option<String>,
}

/// Trace lines read at most; a longer trace is refused rather than loaded without bound.
pub const MAX_TRACE_JOBS: usize = 1_000_000;

fn read_trace(path: &Path, requesters: usize) -> Result<Vec<(u64, usize, JobParams)>, PlanError> {
    let file = std::fs::File::open(path).map_err(|source| PlanError::Read {
        path: path.to_owned(),
        source,
    })?;
    let mut out = Vec::new();
    for (i, line) in std::io::BufReader::new(file).lines().enumerate() {
        let line = line.map_err(|source| PlanError::Read {
            path: path.to_owned(),
            source,
        })?;
        let trimmed = line.trim();
        if trimmed.is_empty() || trimmed.starts_with('#') {
            continue;
        }
        let bad = |problem: String| PlanError::Trace {
            path: path.to_owned(),
            line: i + 1,
            problem,
        };
        if out.len() >= MAX_TRACE_JOBS {
            return Err(bad(format!("more than {MAX_TRACE_JOBS} jobs")));
        }
        let t: TraceLine = serde_json::from_str(trimmed).map_err(|e| {
            bad(format!(
                "{e}; expected a JSON object with at_s (seconds ≥ 0) and optional requester, \
                 width, height, steps, images, cfg, prompt"
            ))
        })?;
        if !(t.at_s.is_finite() && t.at_s >= 0.0) {
            return Err(bad(format!("at_s {}: allowed is a number ≥ 0", t.at_s)));
        }
        let requester = t.requester.unwrap_or(out.len() % requesters);
        if requester >= requesters {
            return Err(bad(format!(
                "requester {requester}: allowed is 0..{} (--requesters)",
                requesters
            )));
        }
        let index = out.len();
        let params = JobParams {
            prompt: t
                .prompt
                .unwrap_or_else(|| PROMPTS[index % PROMPTS.len()].into()),
            negative_prompt: String::new(),
            width: t.width.unwrap_or(1024),
            height: t.height.unwrap_or(1024),
            steps: t.steps.unwrap_or(30),
            true_cfg_scale: t.cfg.unwrap_or(4.0),
            seed: u64::try_from(index).unwrap_or(0),
            images: t.images.unwrap_or(1),
            mode: Mode::TextToImage,
            exact: false,
            lora: None,
            latents: None,
        };
        params.validate().map_err(|e| bad(e.to_string()))?;
        out.push((to_ms(t.at_s * 1000.0), requester, params));
    }
    out.sort_by_key(|(at, _, _)| *at);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(load: Load) -> PlanSpec {
        PlanSpec {
            seed: 7,
            load,
            mix: JobMix::Production,
            duration_ms: DAY_MS,
            requesters: 4,
            providers: 4,
            faults: FaultSpec {
                kills: 1,
                partition: true,
                ..FaultSpec::default()
            },
            adversaries: vec![],
        }
    }

    #[test]
    fn one_seed_gives_one_plan_and_another_seed_another() {
        let a = plan(&spec(Load::Daily {
            peak_per_minute: 2.0,
            zones: 1,
        }))
        .unwrap();
        let b = plan(&spec(Load::Daily {
            peak_per_minute: 2.0,
            zones: 1,
        }))
        .unwrap();
        assert_eq!(a.hash(), b.hash());
        let mut other = spec(Load::Daily {
            peak_per_minute: 2.0,
            zones: 1,
        });
        other.seed = 8;
        assert_ne!(plan(&other).unwrap().hash(), a.hash());
        assert!(a.jobs.iter().all(|j| j.params.validate().is_ok()));
        assert_eq!(a.faults.len(), 2);
    }

    #[test]
    fn the_daily_curve_is_bursty_with_a_quiet_night() {
        let p = plan(&spec(Load::Daily {
            peak_per_minute: 2.0,
            zones: 1,
        }))
        .unwrap();
        let per_hour = |h: u64| p.jobs.iter().filter(|j| j.at_ms / 3_600_000 == h).count();
        let night: usize = (0..5).map(per_hour).sum();
        let noon: usize = (10..15).map(per_hour).sum();
        assert!(noon > 5 * night, "night {night}, noon {noon}");
        // Peak 2/min with a mean of ~0.47 of the peak over the day, plus bursts.
        let total = p.jobs.len();
        assert!((1_100..1_900).contains(&total), "{total} jobs");
        assert!(daily_mean() < 0.5);
    }

    #[test]
    fn time_zones_flatten_the_day_and_keep_requesters_in_their_zone() {
        let mut s = spec(Load::Daily {
            peak_per_minute: 3.0,
            zones: 3,
        });
        s.requesters = 6;
        let p = plan(&s).unwrap();
        let per_hour: Vec<usize> = (0..24)
            .map(|h| p.jobs.iter().filter(|j| j.at_ms / 3_600_000 == h).count())
            .collect();
        let (lo, hi) = (
            per_hour.iter().min().copied().unwrap(),
            per_hour.iter().max().copied().unwrap(),
        );
        // One zone: nights are nearly empty; three zones 8 h apart: no hour is.
        assert!(lo * 6 > hi, "hours {per_hour:?}");
        assert!(p.jobs.iter().all(|j| j.requester < 6));
        s.requesters = 2;
        assert!(plan(&s).unwrap_err().to_string().contains("time zones"));
    }

    #[test]
    fn a_steady_rate_gives_about_the_expected_count() {
        let mut s = spec(Load::Steady { per_minute: 6.0 });
        s.duration_ms = 10 * 60_000;
        let n = plan(&s).unwrap().jobs.len();
        assert!((35..90).contains(&n), "{n}");
    }

    #[test]
    fn traces_are_replayed_and_bad_lines_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.jsonl");
        std::fs::write(
            &path,
            "# a comment\n{\"at_s\": 2.5, \"requester\": 1, \"width\": 512, \"height\": 512}\n{\"at_s\": 1}\n",
        )
        .unwrap();
        let p = plan(&spec(Load::Trace { path: path.clone() })).unwrap();
        assert_eq!(p.jobs.len(), 2);
        assert_eq!(p.jobs[0].at_ms, 1000);
        assert_eq!(p.jobs[1].requester, 1);
        assert_eq!(p.jobs[1].params.width, 512);

        std::fs::write(&path, "{\"at_s\": 1, \"width\": 100}\n").unwrap();
        let e = plan(&spec(Load::Trace { path: path.clone() }))
            .unwrap_err()
            .to_string();
        assert!(e.contains("line 1") && e.contains("width"), "{e}");
        std::fs::write(&path, "{\"at_s\": 1, \"requester\": 9}\n").unwrap();
        let e = plan(&spec(Load::Trace { path })).unwrap_err().to_string();
        assert!(e.contains("requester 9"), "{e}");
    }

    #[test]
    fn bad_rates_and_fault_needs_are_refused() {
        assert!(plan(&spec(Load::Steady { per_minute: 0.0 })).is_err());
        assert!(
            plan(&spec(Load::Steady {
                per_minute: f64::NAN
            }))
            .is_err()
        );
        let mut s = spec(Load::Steady { per_minute: 1.0 });
        s.providers = 1;
        assert!(plan(&s).unwrap_err().to_string().contains("2 providers"));
    }
}
