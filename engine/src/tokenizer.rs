//! The Qwen2 prompt tokenizer for Qwen-Image: loading, the prompt template, truncation and the
//! token count used for metering.
//!
//! Owns: building a [`tokenizers::Tokenizer`] from a `tokenizer/` folder — `tokenizer.json`, or
//! else `vocab.json` + `merges.txt` assembled into the same byte-level BPE transformers'
//! `Qwen2Tokenizer` builds (NFC, the Qwen2 split regex, byte-level, added tokens from
//! `tokenizer_config.json` / `added_tokens.json`) — and [`PromptTokenizer::encode_prompt`],
//! which wraps the prompt in [`PROMPT_TEMPLATE`] and returns the ids with the template-prefix
//! length ([`PromptTokens::drop_index`]) that the text encoder's caller drops.
//!
//! The drop index: the reference pipeline hard-codes 34, the token count of the template prefix
//! (`<|im_start|>system\n…<|im_end|>\n<|im_start|>user\n`) in the real Qwen2 vocabulary. Here it
//! is derived at load time by tokenizing that prefix alone, which gives 34 for the real
//! vocabulary and the right number for any other (the test fixtures' tiny vocabulary gives 58).
//! Like the reference, the same index is used for every prompt.

use std::path::{Path, PathBuf};

use serde::Deserialize;
use tokenizers::models::bpe::BPE;
use tokenizers::normalizers::NFC;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{AddedToken, SplitDelimiterBehavior, Tokenizer};

/// `QwenImagePipeline.prompt_template_encode`; `{}` is replaced by the prompt.
pub const PROMPT_TEMPLATE: &str = "<|im_start|>system\nDescribe the image by detailing the color, shape, size, texture, quantity, text, spatial relationships of the objects and background:<|im_end|>\n<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n";

/// `prompt_template_encode_start_idx` of the reference: the prefix length in the real vocabulary.
pub const QWEN_TEMPLATE_DROP_INDEX: usize = 34;

/// Most tokens kept after the drop (`max_sequence_length` default of the pipeline).
pub const MAX_SEQUENCE_LENGTH: usize = 512;

/// The Qwen2 pre-tokenizer regex (as in Qwen2's `tokenizer.json` and transformers).
const QWEN2_SPLIT_REGEX: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// Special tokens the template needs.
const TEMPLATE_TOKENS: [&str; 2] = ["<|im_start|>", "<|im_end|>"];

/// A tokenized prompt, ready for the text encoder.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PromptTokens {
    /// The whole template with the prompt, cut so that at most `max_sequence_length` tokens
    /// follow the prefix. Includes the prefix, which the encoder needs as context.
    pub ids: Vec<u32>,
    /// Tokens of the user's prompt alone (no template), at most `max_sequence_length`: the
    /// `prompt_len` of the metering formula.
    pub user_prompt_tokens: u32,
    /// Template-prefix tokens to drop from the encoder output (34 for the real tokenizer).
    pub drop_index: usize,
}

impl PromptTokens {
    /// Tokens the transformer will see: `ids.len() - drop_index`.
    pub fn embedding_len(&self) -> usize {
        self.ids.len().saturating_sub(self.drop_index)
    }
}

/// Why a tokenizer could not be loaded or a prompt not be tokenized.
#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    /// The folder has neither `tokenizer.json` nor `vocab.json` + `merges.txt`.
    #[error("no tokenizer.json or vocab.json + merges.txt in {}", dir.display())]
    NotFound {
        /// The folder.
        dir: PathBuf,
    },
    /// A file could not be read.
    #[error("cannot read {}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// A JSON side file (`tokenizer_config.json`, `added_tokens.json`) is malformed.
    #[error("bad {}", path.display())]
    Json {
        /// The file.
        path: PathBuf,
        /// The parse error.
        #[source]
        source: serde_json::Error,
    },
    /// The tokenizers library rejected a file.
    #[error("cannot build the tokenizer from {}", path.display())]
    Build {
        /// The file.
        path: PathBuf,
        /// The library's error.
        #[source]
        source: tokenizers::Error,
    },
    /// An added token did not get the id its config gives it.
    #[error("added token {token} got id {got}, the config says {expected}")]
    AddedTokenId {
        /// The token.
        token: String,
        /// The id in the config.
        expected: u32,
        /// The id it got.
        got: u32,
    },
    /// A special token the prompt template uses is unknown to the tokenizer.
    #[error("the tokenizer has no {0} token, which the prompt template needs")]
    MissingTemplateToken(&'static str),
    /// Tokenizing failed.
    #[error("cannot tokenize the prompt")]
    Encode(#[source] tokenizers::Error),
    /// The template prefix tokenizes to nothing (a broken tokenizer).
    #[error("the template prefix tokenizes to no tokens")]
    EmptyPrefix,
}

/// The Qwen-Image prompt tokenizer.
#[derive(Debug, Clone)]
pub struct PromptTokenizer {
    tokenizer: Tokenizer,
    drop_index: usize,
    max_sequence_length: usize,
}

impl PromptTokenizer {
    /// Loads a `tokenizer/` folder: `tokenizer.json` when present, else `vocab.json` +
    /// `merges.txt` (+ the added tokens of `tokenizer_config.json` / `added_tokens.json`).
    pub fn from_dir(dir: &Path) -> Result<Self, TokenizerError> {
        let json = dir.join("tokenizer.json");
        let tokenizer = if json.is_file() {
            Tokenizer::from_file(&json)
                .map_err(|source| TokenizerError::Build { path: json, source })?
        } else if dir.join("vocab.json").is_file() && dir.join("merges.txt").is_file() {
            qwen2_bpe_from_vocab(dir)?
        } else {
            return Err(TokenizerError::NotFound {
                dir: dir.to_path_buf(),
            });
        };
        Self::from_tokenizer(tokenizer)
    }

    /// Wraps a ready tokenizer; derives the drop index from the template prefix.
    pub fn from_tokenizer(tokenizer: Tokenizer) -> Result<Self, TokenizerError> {
        for t in TEMPLATE_TOKENS {
            if tokenizer.token_to_id(t).is_none() {
                return Err(TokenizerError::MissingTemplateToken(t));
            }
        }
        let (prefix, _) = PROMPT_TEMPLATE
            .split_once("{}")
            .unwrap_or((PROMPT_TEMPLATE, ""));
        let drop_index = encode_ids(&tokenizer, prefix, true)?.len();
        if drop_index == 0 {
            return Err(TokenizerError::EmptyPrefix);
        }
        Ok(Self {
            tokenizer,
            drop_index,
            max_sequence_length: MAX_SEQUENCE_LENGTH,
        })
    }

    /// Keep at most `max` tokens after the drop instead of [`MAX_SEQUENCE_LENGTH`] (the
    /// pipeline's `max_sequence_length`; the reference rejects values above 1024).
    pub fn with_max_sequence_length(mut self, max: usize) -> Self {
        self.max_sequence_length = max.clamp(1, 1024);
        self
    }

    /// Tokens of the template prefix (34 for the real Qwen2 tokenizer).
    pub fn drop_index(&self) -> usize {
        self.drop_index
    }

    /// Most tokens kept after the drop.
    pub fn max_sequence_length(&self) -> usize {
        self.max_sequence_length
    }

    /// The underlying tokenizer.
    pub fn inner(&self) -> &Tokenizer {
        &self.tokenizer
    }

    /// Tokens of `text` on its own, no template: the metering count of a prompt (uncapped).
    pub fn count_tokens(&self, text: &str) -> Result<usize, TokenizerError> {
        Ok(encode_ids(&self.tokenizer, text, false)?.len())
    }

    /// Applies the template, tokenizes, and cuts to `drop_index + max_sequence_length` tokens
    /// (the text encoder is causal, so this equals the reference's cut after encoding).
    pub fn encode_prompt(&self, prompt: &str) -> Result<PromptTokens, TokenizerError> {
        let text = PROMPT_TEMPLATE.replacen("{}", prompt, 1);
        let mut ids = encode_ids(&self.tokenizer, &text, true)?;
        ids.truncate(self.drop_index + self.max_sequence_length);
        let user = self.count_tokens(prompt)?.min(self.max_sequence_length);
        Ok(PromptTokens {
            ids,
            user_prompt_tokens: u32::try_from(user).unwrap_or(u32::MAX),
            drop_index: self.drop_index,
        })
    }
}

fn encode_ids(
    tokenizer: &Tokenizer,
    text: &str,
    special: bool,
) -> Result<Vec<u32>, TokenizerError> {
    let enc = tokenizer
        .encode(text, special)
        .map_err(TokenizerError::Encode)?;
    Ok(enc.get_ids().to_vec())
}

/// One entry of `added_tokens_decoder` in `tokenizer_config.json`.
#[derive(Debug, Deserialize)]
struct AddedTokenEntry {
    content: String,
    #[serde(default)]
    special: bool,
    #[serde(default)]
    lstrip: bool,
    #[serde(default)]
    rstrip: bool,
    #[serde(default)]
    single_word: bool,
    normalized: Option<bool>,
}

#[derive(Debug, Deserialize)]
struct TokenizerConfig {
    #[serde(default)]
    added_tokens_decoder: std::collections::BTreeMap<String, AddedTokenEntry>,
}

fn read_json<T: for<'de> Deserialize<'de>>(path: &Path) -> Result<T, TokenizerError> {
    let text = std::fs::read_to_string(path).map_err(|source| TokenizerError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    serde_json::from_str(&text).map_err(|source| TokenizerError::Json {
        path: path.to_path_buf(),
        source,
    })
}

/// transformers' `Qwen2Tokenizer` from `vocab.json` + `merges.txt`: byte-level BPE, NFC, the
/// Qwen2 split regex, then the added tokens in id order.
fn qwen2_bpe_from_vocab(dir: &Path) -> Result<Tokenizer, TokenizerError> {
    let vocab = dir.join("vocab.json");
    let merges = dir.join("merges.txt");
    let build_err = |source| TokenizerError::Build {
        path: vocab.clone(),
        source,
    };
    let bpe = BPE::from_file(&vocab.to_string_lossy(), &merges.to_string_lossy())
        .build()
        .map_err(build_err)?;
    let mut tokenizer = Tokenizer::new(bpe);
    tokenizer.with_normalizer(Some(NFC)).map_err(build_err)?;
    let split = Split::new(
        SplitPattern::Regex(QWEN2_SPLIT_REGEX.to_string()),
        SplitDelimiterBehavior::Isolated,
        false,
    )
    .map_err(build_err)?;
    tokenizer.with_pre_tokenizer(Some(Sequence::new(vec![
        split.into(),
        ByteLevel::new(false, false, false).into(),
    ])));
    tokenizer.with_decoder(Some(ByteLevel::default()));

    // Added tokens with their ids: `added_tokens_decoder` (id -> token) of tokenizer_config.json,
    // else added_tokens.json (token -> id, all special as the Qwen chat tokens are).
    let mut added: Vec<(u32, AddedToken)> = Vec::new();
    let config = dir.join("tokenizer_config.json");
    if config.is_file() {
        let cfg: TokenizerConfig = read_json(&config)?;
        for (id, e) in cfg.added_tokens_decoder {
            let Ok(id) = id.parse::<u32>() else { continue };
            let token = AddedToken::from(e.content, e.special)
                .lstrip(e.lstrip)
                .rstrip(e.rstrip)
                .single_word(e.single_word)
                .normalized(e.normalized.unwrap_or(!e.special));
            added.push((id, token));
        }
    }
    let side = dir.join("added_tokens.json");
    if added.is_empty() && side.is_file() {
        let map: std::collections::BTreeMap<String, u32> = read_json(&side)?;
        added.extend(
            map.into_iter()
                .map(|(t, id)| (id, AddedToken::from(t, true))),
        );
    }
    added.sort_by_key(|(id, _)| *id);
    for (id, token) in added {
        let content = token.content.clone();
        let added = if token.special {
            tokenizer.add_special_tokens([token])
        } else {
            tokenizer.add_tokens([token])
        };
        added.map_err(build_err)?;
        match tokenizer.token_to_id(&content) {
            Some(got) if got == id => {}
            got => {
                return Err(TokenizerError::AddedTokenId {
                    token: content,
                    expected: id,
                    got: got.unwrap_or(u32::MAX),
                });
            }
        }
    }
    Ok(tokenizer)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn template_has_one_slot_and_the_reference_tail() {
        assert_eq!(PROMPT_TEMPLATE.matches("{}").count(), 1);
        assert!(PROMPT_TEMPLATE.ends_with("{}<|im_end|>\n<|im_start|>assistant\n"));
    }

    #[test]
    fn missing_folder_is_not_found() {
        let err = PromptTokenizer::from_dir(Path::new("/nonexistent/tokenizer"));
        assert!(matches!(err, Err(TokenizerError::NotFound { .. })));
    }
}
