//! Tokenizer parity against transformers' `Qwen2Tokenizer` on the tiny byte-level BPE in
//! `fixtures/tokenizer/` (made by `tools/make_encoder_vae_fixtures.py`): the same ids for the
//! templated prompts, from `tokenizer.json` and from `vocab.json` + `merges.txt`, the same
//! template-prefix length, the 512-token cut and the metering count. Ids must match exactly.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use pixmarket_engine::tokenizer::{MAX_SEQUENCE_LENGTH, PROMPT_TEMPLATE, PromptTokenizer};
use serde::Deserialize;

#[derive(Deserialize)]
struct Case {
    prompt: String,
    ids: Vec<u32>,
    full_len: usize,
    user_prompt_tokens: u32,
}

#[derive(Deserialize)]
struct Expected {
    template: String,
    drop_index: usize,
    max_sequence_length: usize,
    added_tokens: std::collections::BTreeMap<String, u32>,
    cases: Vec<Case>,
}

fn fixture_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tokenizer")
}

fn expected() -> Result<Expected> {
    let text = std::fs::read_to_string(fixture_dir().join("expected.json"))?;
    Ok(serde_json::from_str(&text)?)
}

fn check(tok: &PromptTokenizer, exp: &Expected) -> Result<()> {
    assert_eq!(exp.template, PROMPT_TEMPLATE);
    assert_eq!(exp.max_sequence_length, MAX_SEQUENCE_LENGTH);
    assert_eq!(tok.drop_index(), exp.drop_index, "template prefix length");
    for (token, id) in &exp.added_tokens {
        assert_eq!(
            tok.inner().token_to_id(token),
            Some(*id),
            "added token {token}"
        );
    }
    let mut cut = false;
    for case in &exp.cases {
        let got = tok
            .encode_prompt(&case.prompt)
            .with_context(|| format!("prompt {:?}", case.prompt))?;
        assert_eq!(got.ids, case.ids, "ids of {:?}", case.prompt);
        assert_eq!(got.drop_index, exp.drop_index);
        assert_eq!(
            got.user_prompt_tokens, case.user_prompt_tokens,
            "metering count of {:?}",
            case.prompt
        );
        assert!(got.embedding_len() <= MAX_SEQUENCE_LENGTH);
        cut |= case.full_len > got.ids.len();
    }
    assert!(cut, "the fixtures include a prompt past the 512-token cut");
    Ok(())
}

#[test]
fn tokenizer_json_matches_reference() -> Result<()> {
    let tok = PromptTokenizer::from_dir(&fixture_dir().join("json"))?;
    check(&tok, &expected()?)
}

#[test]
fn vocab_and_merges_match_reference() -> Result<()> {
    let tok = PromptTokenizer::from_dir(&fixture_dir().join("bpe"))?;
    check(&tok, &expected()?)
}

#[test]
fn shorter_max_sequence_length_cuts_after_the_prefix() -> Result<()> {
    let tok = PromptTokenizer::from_dir(&fixture_dir().join("json"))?.with_max_sequence_length(16);
    let exp = expected()?;
    let long = exp.cases.last().context("cases")?;
    let got = tok.encode_prompt(&long.prompt)?;
    assert_eq!(got.ids, long.ids[..exp.drop_index + 16]);
    assert_eq!(got.user_prompt_tokens, 16);
    Ok(())
}

/// With the real Qwen2 vocabulary the derived prefix length must be the reference's hard-coded
/// 34. The vocabulary is too large to commit; point `PIXMARKET_QWEN_TOKENIZER_DIR` at a real
/// `tokenizer/` folder (the Qwen-Image repo's, or one made by `tools/qwen_tiktoken_to_bpe.py`)
/// and run it with `--ignored`; unset, the test fails rather than passing without checking.
#[test]
#[ignore = "needs PIXMARKET_QWEN_TOKENIZER_DIR pointing at the real Qwen2 tokenizer/ folder"]
fn real_qwen_tokenizer_drops_34() -> Result<()> {
    let dir = std::env::var_os("PIXMARKET_QWEN_TOKENIZER_DIR")
        .context("PIXMARKET_QWEN_TOKENIZER_DIR is unset: point it at a real tokenizer/ folder")?;
    let tok = PromptTokenizer::from_dir(Path::new(&dir))?;
    assert_eq!(
        tok.drop_index(),
        pixmarket_engine::tokenizer::QWEN_TEMPLATE_DROP_INDEX
    );
    let got = tok.encode_prompt("A red cat")?;
    // Ids as transformers' Qwen2Tokenizer gives them: "A", " red", " cat", then the tail
    // <|im_end|> \n <|im_start|> assistant \n.
    assert_eq!(
        got.ids[got.drop_index..],
        [32, 2518, 8251, 151_645, 198, 151_644, 77_091, 198]
    );
    assert_eq!(got.user_prompt_tokens, 3);
    Ok(())
}
