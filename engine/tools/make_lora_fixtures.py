#!/usr/bin/env python3
"""LoRA parity fixtures: random LoRAs for the small random pipeline of make_pipeline_fixtures.py,
in the diffusers/PEFT key layout and in the kohya/ComfyUI layout, and the images diffusers makes
with them through `QwenImagePipeline.load_lora_weights`.

Usage (from the repository root, after make_pipeline_fixtures.py; nothing is downloaded):

    /work/venv18/bin/python engine/tools/make_lora_fixtures.py

Writes engine/tests/fixtures/lora/:
- peft.safetensors: `transformer.<module>.lora_A/lora_B.weight`, rank 4, lora_alpha 8 (so scale
  2), saved by `QwenImagePipeline.save_lora_weights` with its adapter metadata;
- kohya.safetensors: `lora_unet_<module with _>.lora_down/lora_up.weight` + `.alpha` (rank 4,
  alpha 2: scale 0.5), written by hand as kohya's scripts lay it out, top-level modules included;
- comfy.safetensors: `diffusion_model.<module>.lora_down/lora_up.weight` + `.alpha`, the layout
  the Qwen-Image-Lightning files use (rank 4, alpha 4);
- expected.safetensors: the final images [H, W, 3] in [0, 1] of the pipeline fixture's
  `t2i_2step` prompt and given noise with each LoRA, with two at once at scales 0.7 and 1.3
  (`set_adapters`), and a "lightning" case: comfy.safetensors, 4 steps, CFG 1, under the
  scheduler config Qwen-Image-Lightning publishes (LIGHTNING below, from ModelTC's
  generate_with_diffusers.py);
- meta.json: the cases, and the Lightning sigmas diffusers computes for 8 and 4 steps at
  1024² and at the fixture size.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

ROOT = Path(__file__).resolve().parents[1] / "tests" / "fixtures"
PIPE = ROOT / "pipeline"
OUT = ROOT / "lora"
RANK = 4

PEFT_TARGETS = [
    "to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj", "to_out.0", "to_add_out",
    "net.0.proj", "net.2", "img_mod.1", "txt_mod.1", "img_in", "proj_out",
]
KOHYA_MODULES = [
    "img_in", "txt_in", "norm_out.linear", "time_text_embed.timestep_embedder.linear_2",
    "transformer_blocks.0.attn.to_k", "transformer_blocks.0.attn.add_v_proj",
    "transformer_blocks.0.attn.to_add_out", "transformer_blocks.1.attn.to_out.0",
    "transformer_blocks.1.img_mlp.net.2", "transformer_blocks.1.txt_mod.1",
]
LIGHTNING = dict(
    base_image_seq_len=256,
    base_shift=math.log(3),
    invert_sigmas=False,
    max_image_seq_len=8192,
    max_shift=math.log(3),
    num_train_timesteps=1000,
    shift=1.0,
    shift_terminal=None,
    stochastic_sampling=False,
    time_shift_type="exponential",
    use_beta_sigmas=False,
    use_dynamic_shifting=True,
    use_exponential_sigmas=False,
    use_karras_sigmas=False,
)
CASES = [
    # name, files with scales, steps, scheduler
    dict(name="peft", loras=[["peft.safetensors", 1.0]], steps=2, scheduler="shipped"),
    dict(name="kohya", loras=[["kohya.safetensors", 1.0]], steps=2, scheduler="shipped"),
    dict(name="both", loras=[["peft.safetensors", 0.7], ["kohya.safetensors", 1.3]], steps=2, scheduler="shipped"),
    dict(name="lightning", loras=[["comfy.safetensors", 1.0]], steps=4, scheduler="lightning"),
]


def pipeline():
    from diffusers import QwenImagePipeline

    pipe = QwenImagePipeline.from_pretrained(str(PIPE / "model"), torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def write_peft(path):
    from diffusers import QwenImagePipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    pipe = pipeline()
    config = LoraConfig(r=RANK, lora_alpha=2 * RANK, target_modules=PEFT_TARGETS, init_lora_weights=False)
    pipe.transformer.add_adapter(config)
    g = torch.Generator().manual_seed(31)
    with torch.no_grad():
        for name, p in pipe.transformer.named_parameters():
            if "lora_A" in name:
                p.copy_(torch.randn(p.shape, generator=g) / p.shape[1] ** 0.5)
            elif "lora_B" in name:
                p.copy_(0.5 * torch.randn(p.shape, generator=g) / RANK ** 0.5)
    QwenImagePipeline.save_lora_weights(
        str(path.parent),
        transformer_lora_layers=get_peft_model_state_dict(pipe.transformer),
        transformer_lora_adapter_metadata=config.to_dict(),
        weight_name=path.name,
    )


def write_kohya(path, comfy=False):
    weights = load_file(str(PIPE / "model" / "transformer" / "diffusion_pytorch_model.safetensors"))
    g = torch.Generator().manual_seed(33 if comfy else 32)
    sd = {}
    for module in KOHYA_MODULES:
        out, inp = weights[f"{module}.weight"].shape
        key = "diffusion_model." + module if comfy else "lora_unet_" + module.replace(".", "_")
        sd[f"{key}.lora_down.weight"] = torch.randn(RANK, inp, generator=g) / inp ** 0.5
        sd[f"{key}.lora_up.weight"] = torch.randn(out, RANK, generator=g) / RANK ** 0.5
        sd[f"{key}.alpha"] = torch.tensor(float(RANK) if comfy else RANK / 2.0)
    save_file(sd, str(path))


def main():
    meta_in = json.loads((PIPE / "meta.json").read_text())
    case0 = next(c for c in meta_in["cases"] if c["name"] == "t2i_2step")
    if OUT.exists():
        shutil.rmtree(OUT)
    OUT.mkdir(parents=True)
    write_peft(OUT / "peft.safetensors")
    write_kohya(OUT / "kohya.safetensors")
    write_kohya(OUT / "comfy.safetensors", comfy=True)
    noise = load_file(str(PIPE / "t2i_2step_latents.safetensors"))["latents"]
    b, c, h, w = noise.shape
    packed = noise.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)

    tensors = {}
    for case in CASES:
        pipe = pipeline()
        if case["scheduler"] == "lightning":
            from diffusers import FlowMatchEulerDiscreteScheduler

            pipe.scheduler = FlowMatchEulerDiscreteScheduler.from_config(LIGHTNING)
        names = []
        for i, (file, _) in enumerate(case["loras"]):
            pipe.load_lora_weights(str(OUT / file), adapter_name=f"a{i}")
            names.append(f"a{i}")
        pipe.set_adapters(names, adapter_weights=[s for _, s in case["loras"]])
        pipe.prompt_template_encode_start_idx = meta_in["drop_index"]
        with torch.no_grad():
            image = pipe(
                prompt=case0["prompt"],
                negative_prompt=None,
                true_cfg_scale=case0["cfg"],
                num_inference_steps=case["steps"],
                height=meta_in["height"],
                width=meta_in["width"],
                latents=packed,
                output_type="np",
            ).images[0]
        tensors[case["name"]] = torch.from_numpy(np.ascontiguousarray(image)).to(torch.float32)
    save_file(tensors, str(OUT / "expected.safetensors"))
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.qwenimage.pipeline_qwenimage import calculate_shift

    sched = FlowMatchEulerDiscreteScheduler.from_config(LIGHTNING)
    sigmas = []
    for steps in (8, 4):
        for tokens in ((1024 // 16) ** 2, (meta_in["width"] // 16) * (meta_in["height"] // 16)):
            mu = calculate_shift(tokens, LIGHTNING["base_image_seq_len"], LIGHTNING["max_image_seq_len"],
                                 LIGHTNING["base_shift"], LIGHTNING["max_shift"])
            sched.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=mu)
            sigmas.append(dict(steps=steps, image_tokens=tokens, sigmas=sched.sigmas.tolist()))
    meta = {"base_case": "t2i_2step", "cases": CASES, "lightning_sigmas": sigmas}
    (OUT / "meta.json").write_text(json.dumps(meta, indent=1))
    total = sum(f.stat().st_size for f in OUT.rglob("*") if f.is_file())
    print(f"LoRA fixtures under {OUT}: {total / 1e6:.3f} MB")


if __name__ == "__main__":
    main()
