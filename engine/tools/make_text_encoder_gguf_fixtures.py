#!/usr/bin/env python3
"""Writes the tiny text encoder of tests/fixtures/text_encoder/sharded/ in llama.cpp's GGUF layout.

The files are written with the official `gguf` package (PyPI, gguf-py of llama.cpp), the way
llama.cpp's convert_hf_to_gguf.py writes a Qwen2.5-VL language model: architecture `qwen2vl`,
tensor names from the package's own name map for that architecture
(`gguf.get_tensor_name_map(MODEL_ARCH.QWEN2VL, ...)`), Q and K as transformers stores them (the
converter permutes them only for the `llama` architecture), 1-D tensors in F32, and the
hyperparameters under `qwen2vl.*`. A tokenizer is not written: pixmarket reads `tokenizer/`.

  f32/model.gguf   every tensor in F32
  q8_0/model.gguf  2-D tensors (token_embd and lm_head included, as the converter does for
                   --outtype q8_0) in Q8_0; a 2-D tensor whose row does not divide into Q8_0's
                   blocks of 32 (ffn_down, rows of 48) falls back to F16, as the converter does

gguf 0.19.0 cannot quantize Q4_K (its `quants.quantize` raises NotImplementedError), and the
tiny encoder's rows of 32 and 48 are shorter than a Q4_K block of 256 anyway: the Q4_K parity
test writes a wider encoder with pixmarket's own writer instead.

Run from the repository root (needs only `gguf`, which brings numpy):

  python3 -m venv target/gguf-venv && target/gguf-venv/bin/pip install gguf==0.19.0
  target/gguf-venv/bin/python engine/tools/make_text_encoder_gguf_fixtures.py

The output is deterministic: a rerun writes byte-identical files.
"""

import json
import struct
from pathlib import Path

import gguf
import numpy as np

ROOT = Path(__file__).resolve().parents[2]
SRC = ROOT / "engine/tests/fixtures/text_encoder/sharded"
OUT = ROOT / "engine/tests/fixtures/text_encoder_gguf"
ARCH = gguf.MODEL_ARCH.QWEN2VL

DTYPES = {"F32": np.float32, "F16": np.float16}


def read_safetensors(path: Path) -> dict:
    """A safetensors file as numpy arrays (the format: u64 header length, JSON header, bytes)."""
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    body = raw[8 + n :]
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        start, end = info["data_offsets"]
        dtype = DTYPES[info["dtype"]]
        out[name] = np.frombuffer(body[start:end], dtype=dtype).reshape(info["shape"]).astype(np.float32)
    return out


def load_language_model() -> tuple[dict, dict]:
    config = json.loads((SRC / "config.json").read_text())
    index = json.loads((SRC / "model.safetensors.index.json").read_text())
    tensors = {}
    for shard in sorted(set(index["weight_map"].values())):
        tensors.update(read_safetensors(SRC / shard))
    text = config["text_config"]
    lm = {k: v for k, v in tensors.items() if k.startswith("model.") or k.startswith("lm_head.")}
    return text, lm


def write(text: dict, lm: dict, path: Path, quantize: bool) -> None:
    n_layers = text["num_hidden_layers"]
    name_map = gguf.get_tensor_name_map(ARCH, n_layers)
    w = gguf.GGUFWriter(str(path), gguf.MODEL_ARCH_NAMES[ARCH])
    w.add_name("pixmarket tiny text encoder")
    w.add_block_count(n_layers)
    w.add_context_length(text["max_position_embeddings"])
    w.add_embedding_length(text["hidden_size"])
    w.add_feed_forward_length(text["intermediate_size"])
    w.add_head_count(text["num_attention_heads"])
    w.add_head_count_kv(text["num_key_value_heads"])
    w.add_rope_freq_base(text["rope_parameters"]["rope_theta"])
    w.add_layer_norm_rms_eps(text["rms_norm_eps"])
    sections = list(text["rope_parameters"]["mrope_section"])
    w.add_rope_dimension_sections(sections + [0] * (4 - len(sections)))
    w.add_file_type(gguf.LlamaFileType.MOSTLY_Q8_0 if quantize else gguf.LlamaFileType.ALL_F32)
    for hf_name in sorted(lm):
        data = lm[hf_name]
        name = name_map.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise SystemExit(f"no llama.cpp name for {hf_name}")
        if quantize and data.ndim == 2:
            try:
                q = gguf.quants.quantize(data, gguf.GGMLQuantizationType.Q8_0)
                w.add_tensor(name, q, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
            except gguf.QuantError:
                w.add_tensor(name, data.astype(np.float16))
        else:
            w.add_tensor(name, data)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def main() -> None:
    text, lm = load_language_model()
    for sub, quantize in [("f32", False), ("q8_0", True)]:
        d = OUT / sub
        d.mkdir(parents=True, exist_ok=True)
        path = d / "model.gguf"
        write(text, lm, path, quantize)
        print(f"{path.relative_to(ROOT)}: {path.stat().st_size} bytes")
    names = sorted(
        t.name for t in gguf.GGUFReader(str(OUT / "q8_0/model.gguf")).tensors
    )
    (OUT / "tensors.json").write_text(
        json.dumps(
            {
                "gguf_package": getattr(gguf, "__version__", "0.19.0"),
                "architecture": gguf.MODEL_ARCH_NAMES[ARCH],
                "tensors": names,
            },
            indent=1,
        )
        + "\n"
    )


if __name__ == "__main__":
    main()
