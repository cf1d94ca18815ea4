//! The node's configuration, `config.toml` in the data folder. Parsed strictly (an unknown key
//! is an error naming it) and validated before anything starts.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::provider::MAX_DEVICES;

/// Errors reading or validating `config.toml`.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("config file {path} is invalid: {message}")]
    Parse { path: String, message: String },
    /// A key's value is wrong; `line` is where the file sets it.
    #[error("config file {path}, line {line}")]
    Located {
        path: String,
        line: usize,
        #[source]
        source: Box<ConfigError>,
    },
    #[error("config key `{key}` is invalid: got {got}; allowed: {allowed}")]
    Invalid {
        key: &'static str,
        got: String,
        allowed: String,
    },
}

/// The smallest circuit a relay may offer: DCUtR's coordination and identify need a few KiB.
pub const MIN_CIRCUIT_BYTES: u64 = 16 * 1024;
/// The largest: a 64 MiB result and its framing, with room.
pub const MAX_CIRCUIT_BYTES: u64 = 256 * 1024 * 1024;
/// `max_connections` above this would undo the point of the bound (each connection costs
/// buffers and a yamux session); a relay serving many NATed nodes may need up to this.
pub const MAX_MAX_CONNECTIONS: u32 = 4096;

/// The whole node configuration.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NodeConfig {
    /// libp2p multiaddresses to listen on.
    pub listen: Vec<String>,
    /// Peers to dial at start-up to join the network (multiaddresses ending in `/p2p/<peer-id>`).
    pub bootstrap: Vec<String>,
    /// Discover peers on the local network with mDNS.
    pub mdns: bool,
    /// Serve Prometheus metrics on this `HOST:PORT` (e.g. "127.0.0.1:9464"); empty = off.
    pub metrics: String,
    /// Serve the HTTP API on this `HOST:PORT` (e.g. "127.0.0.1:7878"); empty = off. A
    /// non-loopback address also needs `--api-public`.
    pub api: String,
    /// Serve as a relay for nodes behind NAT (`--relay`); only useful on a public address.
    pub relay: bool,
    /// As a relay, the bytes one circuit may carry. The default (131072) is enough for a hole
    /// punch's coordination and a quote, not for results; raise it (e.g. 67108864) to let
    /// results travel through this relay when hole punching fails.
    pub relay_circuit_bytes: u64,
    /// Ask the router for a port mapping over UPnP (`--upnp`).
    pub upnp: bool,
    /// Connections kept at most; past it new ones are denied.
    pub max_connections: u32,
    pub provider: ProviderConfig,
    /// Named API tokens beside the cookie token the node writes at each start.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub api_tokens: Vec<ApiTokenConfig>,
}

/// A named API token: `[[api_tokens]]` with `name`, `token` (random, 32 characters or more)
/// and `scopes` (`read`, `buy`, `admin`). The API checks them when it starts.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiTokenConfig {
    pub name: String,
    pub token: String,
    pub scopes: Vec<String>,
}

/// Settings used when the node sells generation (`pixmarket node --provide`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ProviderConfig {
    /// A model folder in the diffusers layout, or `tiny` for the built-in tiny model.
    pub model: String,
    /// Compute precision: `f32`, `bf16` or `f16`.
    pub dtype: String,
    /// One device, `cpu`, `cuda` or `cuda:N`: the form of older config files. Set this or
    /// `devices`, not both.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device: Option<String>,
    /// The devices to serve on, e.g. `["cuda:0", "cuda:1"]`: one engine and one worker each,
    /// each loading its own copy of the weights. `cpu` may repeat (several workers sharing
    /// the processor, for testing); a GPU may not. [default: `["cpu"]`]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub devices: Option<Vec<String>>,
    /// Run the text encoder on the CPU (frees ~14 GB of a 24 or 16 GB card in bf16).
    pub text_encoder_on_cpu: bool,
    /// The device's memory in GiB: the engine plans the placement for it and the provider
    /// advertises, and accepts, only the sizes the plan allows. 0 = no plan.
    pub device_memory_gib: u32,
    /// Multiplier on the base price, as a decimal string (no floats in money), e.g. "1.5".
    pub price_factor: String,
    /// Prompts shorter than this are billed as this many tokens.
    pub min_prompt_tokens: u32,
    /// Jobs waiting beyond this are refused with `Busy`.
    pub max_queue: u32,
    /// Compatible jobs run together in one transformer batch, up to this many.
    pub max_batch: u32,
    /// Credit granted to a peer with no deposit, in tokens (decimal string).
    pub new_peer_credit: String,
    /// Step caching for jobs that do not require exact computation: the first-block
    /// threshold as a decimal string in (0, 1] with at most 3 decimals, or "off". Advertised,
    /// quoted and recorded in every receipt; see docs/benchmarks.md for its cost in quality.
    pub step_cache_threshold: String,
    /// Run jobs whose requester requires exact computation (with step caching off for them);
    /// `false` refuses them at the quote with `ExactUnavailable`.
    pub serve_exact: bool,
    /// Bound of the prompt-embedding cache, in bytes (0 = off).
    pub prompt_cache_bytes: u64,
    /// LoRAs offered to jobs (`[[provider.loras]]`): advertised by name and the blake3 hash of
    /// the file; a job names one by hash and a scale.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub loras: Vec<LoraOfferConfig>,
}

/// One LoRA a provider offers.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoraOfferConfig {
    /// Shown to requesters; `pixmarket market generate --lora NAME` finds it by this.
    pub name: String,
    /// The LoRA file (safetensors; diffusers/PEFT or kohya/ComfyUI keys).
    pub file: String,
    /// Run its jobs on the scheduler config the Qwen-Image-Lightning LoRAs are published with
    /// (for `--preset lightning-8` / `lightning-4`).
    #[serde(default)]
    pub lightning: bool,
}

impl Default for NodeConfig {
    fn default() -> Self {
        Self {
            listen: vec![
                "/ip4/0.0.0.0/tcp/0".into(),
                "/ip4/0.0.0.0/udp/0/quic-v1".into(),
            ],
            bootstrap: Vec::new(),
            mdns: true,
            metrics: String::new(),
            api: String::new(),
            relay: false,
            relay_circuit_bytes: crate::network::COORDINATION_CIRCUIT_BYTES,
            upnp: false,
            max_connections: crate::network::DEFAULT_MAX_CONNECTIONS,
            provider: ProviderConfig::default(),
            api_tokens: Vec::new(),
        }
    }
}

impl Default for ProviderConfig {
    fn default() -> Self {
        Self {
            model: "tiny".into(),
            dtype: "f32".into(),
            device: None,
            devices: Some(vec!["cpu".into()]),
            text_encoder_on_cpu: false,
            device_memory_gib: 0,
            price_factor: "1".into(),
            min_prompt_tokens: 0,
            // A queue of 16 images at ~20 s each is about five minutes of work.
            max_queue: 16,
            max_batch: 2,
            new_peer_credit: "0".into(),
            step_cache_threshold: DEFAULT_STEP_CACHE_THRESHOLD.into(),
            serve_exact: true,
            prompt_cache_bytes: pixmarket_engine::pipeline::DEFAULT_PROMPT_CACHE_BYTES,
            loras: Vec::new(),
        }
    }
}

/// LoRA offers: at most the advert's bound, each with a short unique name and a file.
fn check_loras(loras: &[LoraOfferConfig]) -> Result<(), ConfigError> {
    use pixmarket_protocol::validate::{MAX_ADVERT_LORAS, MAX_LABEL_CHARS};
    let bad = |got: String, allowed: String| ConfigError::Invalid {
        key: "provider.loras",
        got,
        allowed,
    };
    if loras.len() > MAX_ADVERT_LORAS {
        return Err(bad(
            format!("{} LoRAs", loras.len()),
            format!("at most {MAX_ADVERT_LORAS}"),
        ));
    }
    let mut names = std::collections::BTreeSet::new();
    for l in loras {
        let n = l.name.chars().count();
        if n == 0 || n > MAX_LABEL_CHARS || l.name.trim() != l.name {
            return Err(bad(
                format!("name {:?}", l.name),
                format!("1..={MAX_LABEL_CHARS} characters without surrounding spaces"),
            ));
        }
        if !names.insert(l.name.as_str()) {
            return Err(bad(
                format!("name {:?} twice", l.name),
                "unique names".into(),
            ));
        }
        if l.file.is_empty() {
            return Err(bad(
                format!("{:?} with an empty file", l.name),
                "the path of a LoRA safetensors file".into(),
            ));
        }
    }
    Ok(())
}

impl NodeConfig {
    /// Reads and validates `path`.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.display().to_string(),
            source,
        })?;
        let shown = path.display().to_string();
        let cfg: NodeConfig = toml::from_str(&text).map_err(|e| {
            let at = e.span().map(|span| {
                let (line, column) = line_column(&text, span.start);
                match section_at(&text, span.start) {
                    Some(section) => format!(" at line {line}, column {column} (in [{section}])"),
                    None => format!(" at line {line}, column {column}"),
                }
            });
            ConfigError::Parse {
                path: shown.clone(),
                message: format!("{}{}", e.message().trim_end(), at.unwrap_or_default()),
            }
        })?;
        cfg.validate().map_err(|e| match &e {
            ConfigError::Invalid { key, .. } => match key_line(&text, key) {
                Some(line) => ConfigError::Located {
                    path: shown.clone(),
                    line,
                    source: Box::new(e),
                },
                None => e,
            },
            _ => e,
        })?;
        Ok(cfg)
    }

    /// The default configuration as commented TOML.
    pub fn default_toml() -> String {
        let body = toml::to_string_pretty(&NodeConfig::default()).unwrap_or_default();
        format!("# pixmarket node configuration. See README.md for every key.\n{body}")
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        for (key, list) in [("listen", &self.listen), ("bootstrap", &self.bootstrap)] {
            for a in list {
                a.parse::<libp2p::Multiaddr>()
                    .map_err(|e| ConfigError::Invalid {
                        key,
                        got: format!("{a:?}"),
                        allowed: format!(
                            "libp2p multiaddresses such as /ip4/0.0.0.0/tcp/4001 ({e})"
                        ),
                    })?;
            }
        }
        if !self.metrics.is_empty() && self.metrics.parse::<std::net::SocketAddr>().is_err() {
            return Err(ConfigError::Invalid {
                key: "metrics",
                got: format!("{:?}", self.metrics),
                allowed: "HOST:PORT such as 127.0.0.1:9464, or empty for off".into(),
            });
        }
        if !self.api.is_empty() && self.api.parse::<std::net::SocketAddr>().is_err() {
            return Err(ConfigError::Invalid {
                key: "api",
                got: format!("{:?}", self.api),
                allowed: "HOST:PORT such as 127.0.0.1:7878, or empty for off".into(),
            });
        }
        if !(MIN_CIRCUIT_BYTES..=MAX_CIRCUIT_BYTES).contains(&self.relay_circuit_bytes) {
            return Err(ConfigError::Invalid {
                key: "relay_circuit_bytes",
                got: self.relay_circuit_bytes.to_string(),
                allowed: format!("{MIN_CIRCUIT_BYTES} to {MAX_CIRCUIT_BYTES} bytes"),
            });
        }
        if !(1..=MAX_MAX_CONNECTIONS).contains(&self.max_connections) {
            return Err(ConfigError::Invalid {
                key: "max_connections",
                got: self.max_connections.to_string(),
                allowed: format!("1 to {MAX_MAX_CONNECTIONS}"),
            });
        }
        let p = &self.provider;
        if !matches!(p.dtype.as_str(), "f32" | "bf16" | "f16") {
            return Err(ConfigError::Invalid {
                key: "provider.dtype",
                got: format!("{:?}", p.dtype),
                allowed: "f32, bf16 or f16".into(),
            });
        }
        if let (Some(one), Some(list)) = (&p.device, &p.devices) {
            return Err(ConfigError::Invalid {
                key: "provider.devices",
                got: format!("both device = {one:?} and devices = {list:?}"),
                allowed: "one of the two: `devices = [..]`, or the older `device = \"..\"`".into(),
            });
        }
        if let Some(one) = &p.device {
            check_device(one).map_err(|DeviceError { got, allowed }| ConfigError::Invalid {
                key: "provider.device",
                got,
                allowed,
            })?;
        }
        if let Some(list) = &p.devices {
            check_devices(list).map_err(|DeviceError { got, allowed }| ConfigError::Invalid {
                key: "provider.devices",
                got,
                allowed,
            })?;
        }
        pixmarket_protocol::PriceSchedule::parse_factor(&p.price_factor).map_err(|e| {
            ConfigError::Invalid {
                key: "provider.price_factor",
                got: format!("{:?}", p.price_factor),
                allowed: e.to_string(),
            }
        })?;
        p.new_peer_credit
            .parse::<pixmarket_protocol::MicroTokens>()
            .map_err(|e| ConfigError::Invalid {
                key: "provider.new_peer_credit",
                got: format!("{:?}", p.new_peer_credit),
                allowed: e.to_string(),
            })?;
        if !(1..=1024).contains(&p.max_queue) {
            return Err(ConfigError::Invalid {
                key: "provider.max_queue",
                got: p.max_queue.to_string(),
                allowed: "1..=1024".into(),
            });
        }
        parse_step_cache_threshold(&p.step_cache_threshold)?;
        if !(1..=8).contains(&p.max_batch) {
            return Err(ConfigError::Invalid {
                key: "provider.max_batch",
                got: p.max_batch.to_string(),
                allowed: "1..=8".into(),
            });
        }
        check_loras(&p.loras)?;
        Ok(())
    }

    /// The provider's price schedule from `price_factor` and `min_prompt_tokens`.
    pub fn schedule(&self) -> Result<pixmarket_protocol::PriceSchedule, ConfigError> {
        self.validate()?;
        let price_factor_ppm = pixmarket_protocol::PriceSchedule::parse_factor(
            &self.provider.price_factor,
        )
        .map_err(|e| ConfigError::Invalid {
            key: "provider.price_factor",
            got: self.provider.price_factor.clone(),
            allowed: e.to_string(),
        })?;
        let schedule = pixmarket_protocol::PriceSchedule {
            price_factor_ppm,
            min_prompt_tokens: self.provider.min_prompt_tokens,
        };
        schedule.validate().map_err(|e| ConfigError::Invalid {
            key: "provider.price_factor",
            got: e.got,
            allowed: e.allowed,
        })?;
        Ok(schedule)
    }
}

impl ProviderConfig {
    /// The devices to serve on: `devices`, else the older `device`, else the processor.
    pub fn device_list(&self) -> Vec<String> {
        match (&self.devices, &self.device) {
            (Some(list), _) => list.clone(),
            (None, Some(one)) => vec![one.clone()],
            (None, None) => vec!["cpu".into()],
        }
    }
}

/// Why a device name or list is refused: what was given, and what is allowed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("got {got}; allowed: {allowed}")]
pub struct DeviceError {
    pub got: String,
    pub allowed: String,
}

/// Refuses `name` unless it is `cpu`, `cuda` or `cuda:N`.
pub fn check_device(name: &str) -> Result<(), DeviceError> {
    if name == "cpu" || gpu_index(name).is_some() {
        Ok(())
    } else {
        Err(DeviceError {
            got: format!("{name:?}"),
            allowed: "cpu, cuda or cuda:N".into(),
        })
    }
}

/// The GPU index of `cuda` (0) or `cuda:N`.
fn gpu_index(name: &str) -> Option<u32> {
    if name == "cuda" {
        return Some(0);
    }
    name.strip_prefix("cuda:")?.parse().ok()
}

/// Refuses `list` unless it names 1..=[`MAX_DEVICES`] valid devices, no GPU twice (`cuda` is
/// `cuda:0`): two engines on one card would only share it.
pub fn check_devices(list: &[String]) -> Result<(), DeviceError> {
    if list.is_empty() || list.len() > MAX_DEVICES {
        return Err(DeviceError {
            got: format!("{} devices", list.len()),
            allowed: format!("1..={MAX_DEVICES} devices"),
        });
    }
    let mut gpus = std::collections::BTreeSet::new();
    for name in list {
        check_device(name)?;
        if let Some(i) = gpu_index(name)
            && !gpus.insert(i)
        {
            return Err(DeviceError {
                got: format!("GPU {i} twice ({name:?})"),
                allowed: "each GPU once (`cuda` is `cuda:0`); only `cpu` may repeat".into(),
            });
        }
    }
    Ok(())
}

/// The default `step_cache_threshold`, chosen from the measured curve in docs/benchmarks.md.
pub const DEFAULT_STEP_CACHE_THRESHOLD: &str = "off";

/// Parses `step_cache_threshold`: "off" (or "0") is exact; else a decimal in (0, 1] with at
/// most three decimals, as per-mille.
pub fn parse_step_cache_threshold(
    text: &str,
) -> Result<pixmarket_protocol::StepCaching, ConfigError> {
    let bad = || ConfigError::Invalid {
        key: "provider.step_cache_threshold",
        got: format!("{text:?}"),
        allowed: "\"off\", or a decimal in (0, 1] with at most 3 decimals, e.g. \"0.2\"".into(),
    };
    let t = text.trim();
    if t == "off" {
        return Ok(pixmarket_protocol::StepCaching::Exact);
    }
    let (int, frac) = t.split_once('.').unwrap_or((t, ""));
    if int.is_empty() && frac.is_empty()
        || frac.len() > 3
        || !int.bytes().all(|b| b.is_ascii_digit())
        || !frac.bytes().all(|b| b.is_ascii_digit())
    {
        return Err(bad());
    }
    let int: u32 = if int.is_empty() {
        0
    } else {
        int.parse().map_err(|_| bad())?
    };
    let frac: u32 = format!("{frac:0<3}").parse().map_err(|_| bad())?;
    let permille = int
        .checked_mul(1000)
        .and_then(|i| i.checked_add(frac))
        .ok_or_else(bad)?;
    match u16::try_from(permille) {
        Ok(0) => Ok(pixmarket_protocol::StepCaching::Exact),
        Ok(threshold_permille @ 1..=1000) => {
            Ok(pixmarket_protocol::StepCaching::FirstBlock { threshold_permille })
        }
        _ => Err(bad()),
    }
}

/// 1-based line and column of byte `offset` in `text`.
fn line_column(text: &str, offset: usize) -> (usize, usize) {
    let before = text.get(..offset).unwrap_or(text);
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (line, column)
}

/// The `[section]` that byte `offset` of `text` is in, if any.
fn section_at(text: &str, offset: usize) -> Option<String> {
    let before = text.get(..offset).unwrap_or(text);
    before
        .lines()
        .rev()
        .find_map(|l| section_header(l.trim()))
        .map(str::to_owned)
}

fn section_header(line: &str) -> Option<&str> {
    line.strip_prefix('[')?.split(']').next().map(str::trim)
}

/// The 1-based line that sets `key` (`name` or `section.name`), if the file sets it.
fn key_line(text: &str, key: &str) -> Option<usize> {
    let (section, name) = match key.rsplit_once('.') {
        Some((s, n)) => (Some(s), n),
        None => (None, key),
    };
    let mut current: Option<&str> = None;
    for (i, raw) in text.lines().enumerate() {
        let line = raw.trim();
        if let Some(h) = section_header(line) {
            current = Some(h);
            continue;
        }
        let sets = line
            .split_once('=')
            .is_some_and(|(k, _)| k.trim().trim_matches('"') == name);
        if sets && current == section {
            return Some(i + 1);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn step_cache_thresholds_parse_to_per_mille() {
        use pixmarket_protocol::StepCaching::{Exact, FirstBlock};
        for (text, want) in [
            ("off", Exact),
            ("0", Exact),
            ("0.000", Exact),
            (
                "0.2",
                FirstBlock {
                    threshold_permille: 200,
                },
            ),
            (
                ".05",
                FirstBlock {
                    threshold_permille: 50,
                },
            ),
            (
                "1",
                FirstBlock {
                    threshold_permille: 1000,
                },
            ),
            (
                "0.125",
                FirstBlock {
                    threshold_permille: 125,
                },
            ),
        ] {
            assert_eq!(parse_step_cache_threshold(text).unwrap(), want, "{text}");
        }
        for bad in ["", ".", "1.001", "2", "0.0001", "-0.1", "0,2", "on", "1e-1"] {
            let e = parse_step_cache_threshold(bad).unwrap_err().to_string();
            assert!(e.contains("step_cache_threshold"), "{bad}: {e}");
        }
    }

    #[test]
    fn default_config_round_trips() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.toml");
        std::fs::write(&path, NodeConfig::default_toml()).unwrap();
        assert_eq!(NodeConfig::load(&path).unwrap(), NodeConfig::default());
    }

    #[test]
    fn unknown_and_bad_keys_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.toml");
        std::fs::write(&path, "listne = []\n").unwrap();
        let err = NodeConfig::load(&path).unwrap_err().to_string();
        assert!(err.contains("listne"), "{err}");

        std::fs::write(&path, "[provider]\nprice_factor = \"-2\"\n").unwrap();
        let err = NodeConfig::load(&path).unwrap_err();
        let source = std::error::Error::source(&err).unwrap().to_string();
        assert!(source.contains("provider.price_factor"), "{source}");

        for (text, key) in [
            ("listen = [\"not an address\"]\n", "listen"),
            ("metrics = \"localhost\"\n", "metrics"),
            ("[provider]\ndtype = \"fp8\"\n", "provider.dtype"),
            ("[provider]\ndevice = \"tpu\"\n", "provider.device"),
            (
                "[provider]\ndevices = [\"cuda:0\", \"tpu\"]\n",
                "provider.devices",
            ),
            ("[provider]\ndevices = []\n", "provider.devices"),
            (
                "[provider]\ndevices = [\"cuda\", \"cuda:0\"]\n",
                "provider.devices",
            ),
            ("[provider]\nmax_queue = 0\n", "provider.max_queue"),
        ] {
            std::fs::write(&path, text).unwrap();
            let err = NodeConfig::load(&path).unwrap_err();
            let chain = format!(
                "{err} {}",
                std::error::Error::source(&err)
                    .map(ToString::to_string)
                    .unwrap_or_default()
            );
            assert!(chain.contains(key), "{text}: {chain}");
        }
    }

    #[test]
    fn one_device_or_a_list_but_not_both() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.toml");
        // An older file's single device still works.
        std::fs::write(&path, "[provider]\ndevice = \"cuda:1\"\n").unwrap();
        let cfg = NodeConfig::load(&path).unwrap();
        assert_eq!(cfg.provider.device_list(), ["cuda:1"]);

        std::fs::write(&path, "[provider]\ndevices = [\"cuda:0\", \"cuda:1\"]\n").unwrap();
        let cfg = NodeConfig::load(&path).unwrap();
        assert_eq!(cfg.provider.device_list(), ["cuda:0", "cuda:1"]);

        std::fs::write(&path, "[provider]\ndevices = [\"cpu\", \"cpu\", \"cpu\"]\n").unwrap();
        assert_eq!(
            NodeConfig::load(&path)
                .unwrap()
                .provider
                .device_list()
                .len(),
            3
        );

        // Neither: the processor.
        std::fs::write(&path, "[provider]\nmax_batch = 1\n").unwrap();
        assert_eq!(
            NodeConfig::load(&path).unwrap().provider.device_list(),
            ["cpu"]
        );

        std::fs::write(
            &path,
            "[provider]\ndevice = \"cuda\"\ndevices = [\"cuda:0\", \"cuda:1\"]\n",
        )
        .unwrap();
        let err = NodeConfig::load(&path).unwrap_err();
        assert!(err.to_string().contains("line 3"), "{err}");
        let source = std::error::Error::source(&err).unwrap().to_string();
        assert!(source.contains("provider.devices"), "{source}");
        assert!(source.contains("both"), "{source}");

        let seventeen: Vec<String> = (0..=MAX_DEVICES).map(|i| format!("\"cuda:{i}\"")).collect();
        std::fs::write(
            &path,
            format!("[provider]\ndevices = [{}]\n", seventeen.join(", ")),
        )
        .unwrap();
        let err = NodeConfig::load(&path).unwrap_err();
        let source = std::error::Error::source(&err).unwrap().to_string();
        assert!(source.contains("1..=16 devices"), "{source}");
    }

    #[test]
    fn errors_say_the_line_and_section() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.toml");
        std::fs::write(&path, "mdns = true\n\n[provider]\nmax_batch = \"two\"\n").unwrap();
        let err = NodeConfig::load(&path).unwrap_err().to_string();
        assert!(err.contains("line 4"), "{err}");
        assert!(err.contains("[provider]"), "{err}");

        std::fs::write(&path, "mdns = true\n[provider]\nmax_queue = 0\n").unwrap();
        let err = NodeConfig::load(&path).unwrap_err();
        assert!(err.to_string().contains("line 3"), "{err}");
        let source = std::error::Error::source(&err).unwrap().to_string();
        assert!(source.contains("provider.max_queue"), "{source}");
    }
}
