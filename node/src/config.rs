//! The node's configuration, `config.toml` in the data folder. Parsed strictly (an unknown key
//! is an error naming it) and validated before anything starts.

use std::path::Path;

use serde::{Deserialize, Serialize};

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
    pub provider: ProviderConfig,
}

/// Settings used when the node sells generation (`pixmarket node --provide`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ProviderConfig {
    /// A model folder in the diffusers layout, or `tiny` for the built-in tiny model.
    pub model: String,
    /// Compute precision: `f32`, `bf16` or `f16`.
    pub dtype: String,
    /// `cpu`, `cuda` or `cuda:N`.
    pub device: String,
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
            provider: ProviderConfig::default(),
        }
    }
}

impl Default for ProviderConfig {
    fn default() -> Self {
        Self {
            model: "tiny".into(),
            dtype: "f32".into(),
            device: "cpu".into(),
            text_encoder_on_cpu: false,
            device_memory_gib: 0,
            price_factor: "1".into(),
            min_prompt_tokens: 0,
            // A queue of 16 images at ~20 s each is about five minutes of work.
            max_queue: 16,
            max_batch: 2,
            new_peer_credit: "0".into(),
        }
    }
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
        let p = &self.provider;
        if !matches!(p.dtype.as_str(), "f32" | "bf16" | "f16") {
            return Err(ConfigError::Invalid {
                key: "provider.dtype",
                got: format!("{:?}", p.dtype),
                allowed: "f32, bf16 or f16".into(),
            });
        }
        if !(p.device == "cpu"
            || p.device == "cuda"
            || p.device
                .strip_prefix("cuda:")
                .is_some_and(|n| n.parse::<u32>().is_ok()))
        {
            return Err(ConfigError::Invalid {
                key: "provider.device",
                got: format!("{:?}", p.device),
                allowed: "cpu, cuda or cuda:N".into(),
            });
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
        if !(1..=8).contains(&p.max_batch) {
            return Err(ConfigError::Invalid {
                key: "provider.max_batch",
                got: p.max_batch.to_string(),
                allowed: "1..=8".into(),
            });
        }
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
