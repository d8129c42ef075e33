#!/usr/bin/env python3
"""Convert the bundled SDXL diffusers folder fixtures/tiny-sdxl to one single-file checkpoint in
the original SDXL (Stability `sgm`) layout, as A1111 and ComfyUI keep SDXL models, stored in
float16 as most SDXL checkpoints are; then check the file independently with diffusers' own
single-file loader.

    python tools/make_single_file_sdxl.py       # writes fixtures/tiny-sdxl-single.safetensors

The key mapping (written out in tools/make_single_file.py, shared here):

* UNet  -> `model.diffusion_model.*` as for SD 1.x/2.x, plus SDXL's added conditioning:
  diffusers' `add_embedding.linear_{1,2}` is `label_emb.0.{0,2}`; several transformer blocks
  per attention keep their `transformer_blocks.N` names.
* VAE   -> `first_stage_model.*` as for SD 1.x/2.x.
* first text encoder (CLIP ViT-L, a transformers CLIPTextModel) -> `conditioner.embedders.0.
  transformer.text_model.*`, names unchanged, plus the `position_ids` buffer real files carry.
* second text encoder (OpenCLIP bigG, a CLIPTextModelWithProjection) -> `conditioner.
  embedders.1.model.*` in the OpenCLIP layout (`transformer.resblocks.N`, q/k/v fused into
  `attn.in_proj_*`, `ln_final`, `positional_embedding`), every block used, `text_projection`
  = the transpose of diffusers' `text_projection.weight`, and OpenCLIP's `logit_scale`.

Storage: every floating tensor in float16 (the f32 file would be 26 MB, f16 is half). The file
therefore holds the folder's weights rounded to float16, and the check compares against exactly
that: diffusers 0.42.1 `StableDiffusionXLPipeline.from_single_file(file, config=<folder>)`,
loaded in float32, must give every UNet / VAE / text-encoder tensor of the folder rounded to
float16 (and back) bit for bit, and the same outputs (to 1e-5; float32 summation order aside)
as the folder's pipeline with its weights so rounded, on seeded inputs.
"""

import argparse
import json
import math
import os
import sys

import torch
from safetensors.torch import load_file, save_file

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from make_single_file import open_clip, unet_key, vae_key  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PARTS = ("unet", "vae", "text_encoder", "text_encoder_2")


def convert(folder):
    """The folder's tensors under their original SDXL names (float32, not yet rounded)."""
    read = lambda rel: load_file(os.path.join(folder, rel))  # noqa: E731
    cfg = lambda rel: json.load(open(os.path.join(folder, rel)))  # noqa: E731
    unet = read("unet/diffusion_pytorch_model.safetensors")
    vae = read("vae/diffusion_pytorch_model.safetensors")
    te = read("text_encoder/model.safetensors")
    te2 = read("text_encoder_2/model.safetensors")
    ucfg, vcfg = cfg("unet/config.json"), cfg("vae/config.json")
    t2cfg = cfg("text_encoder_2/config.json")
    attn_up = [t.startswith("CrossAttn") for t in ucfg["up_block_types"]]
    out = {}
    for k, v in unet.items():
        out["model.diffusion_model." + unet_key(k, ucfg["layers_per_block"], attn_up)] = v
    levels = len(vcfg["block_out_channels"])
    for k, v in vae.items():
        name, conv = vae_key(k, levels)
        out["first_stage_model." + name] = v[:, :, None, None] if conv else v
    for k, v in te.items():
        out["conditioner.embedders.0.transformer." + k] = v
    positions = te["text_model.embeddings.position_embedding.weight"].shape[0]
    out["conditioner.embedders.0.transformer.text_model.embeddings.position_ids"] = (
        torch.arange(positions, dtype=torch.int64)[None, :])
    for k, v in open_clip(te2, t2cfg["hidden_size"], 0, sd2=False).items():
        out["conditioner.embedders.1.model." + k] = v
    # q/k/v fused in te2 (6 tensors -> 2 per layer), position_ids, logit_scale
    want = len(unet) + len(vae) + len(te) + len(te2) - 4 * t2cfg["num_hidden_layers"] + 2
    assert len(out) == want, (len(out), want)
    return {k: v.contiguous() for k, v in out.items()}


def to_f16(tensors):
    return {k: v.half() if v.is_floating_point() else v for k, v in tensors.items()}


def check(path, folder):
    """Independent check: diffusers' single-file loader on our file against the folder's
    pipeline with its weights rounded to float16."""
    from diffusers import StableDiffusionXLPipeline

    ours = StableDiffusionXLPipeline.from_single_file(
        path, config=folder, local_files_only=True, torch_dtype=torch.float32)
    ref = StableDiffusionXLPipeline.from_pretrained(folder, local_files_only=True)
    worst, exact, counts = 0.0, 0.0, []
    for part in PARTS:
        model = getattr(ref, part)
        with torch.no_grad():
            for p in model.parameters():
                exact = max(exact, (p.half().float() - p).abs().max().item())
                p.copy_(p.half().float())
        a, b = getattr(ours, part).state_dict(), model.state_dict()
        counts.append(f"{len(b)} {part}")
        assert a.keys() == b.keys(), (part, sorted(a.keys() ^ b.keys())[:5])
        for k in b:
            assert a[k].dtype == torch.float32, (part, k, a[k].dtype)
            d = (a[k].float() - b[k].float()).abs().max().item() if b[k].numel() else 0.0
            worst = max(worst, d)
            assert d == 0.0, f"{part}.{k} differs by {d}"
    print(f"state dicts: {', '.join(counts)} tensors, all equal to the folder's rounded to "
          f"float16 (max |diff| {worst}; the rounding itself moved weights by up to {exact:.3e})")
    g = torch.Generator().manual_seed(0)
    ucfg = ref.unet.config
    lat = torch.randn((1, ucfg.in_channels, ucfg.sample_size, ucfg.sample_size), generator=g)
    img = torch.rand((1, 3, 64, 64), generator=g) * 2 - 1
    prompt = "a photo of a cat"
    with torch.no_grad():
        ea = ours.encode_prompt(prompt, device="cpu", do_classifier_free_guidance=False)
        eb = ref.encode_prompt(prompt, device="cpu", do_classifier_free_guidance=False)
        emb, pooled = eb[0], eb[2]
        size = ucfg.sample_size * ref.vae_scale_factor
        ids = torch.tensor([[size, size, 0, 0, size, size]], dtype=torch.float32)
        cond = {"text_embeds": pooled, "time_ids": ids}
        ua = ours.unet(lat, 500, encoder_hidden_states=emb, added_cond_kwargs=cond).sample
        ub = ref.unet(lat, 500, encoder_hidden_states=emb, added_cond_kwargs=cond).sample
        va = ours.vae.encode(img).latent_dist.mean
        vb = ref.vae.encode(img).latent_dist.mean
        da = ours.vae.decode(va).sample
        db = ref.vae.decode(vb).sample
    rows = (("text", ea[0], eb[0]), ("pooled", ea[2], eb[2]), ("unet", ua, ub),
            ("vae.encode", va, vb), ("vae.decode", da, db))
    # The tensors are equal, yet the UNet's output may differ in the last float32 bits: the
    # two models run the same code on equal weights whose memory differs (seen: 2e-6 on the
    # UNet, while copying one model's parameters into the other gives that other's output).
    for name, x, y in rows:
        d = (x - y).abs().max().item()
        scale = y.abs().max().item()
        print(f"{name:10} max |diff| {d:.3e} (max |value| {scale:.3f})")
        assert d <= 1e-5 * max(1.0, scale), name


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--folder", default=os.path.join(ROOT, "fixtures/tiny-sdxl"))
    ap.add_argument("--out", default=os.path.join(ROOT, "fixtures/tiny-sdxl-single.safetensors"))
    ap.add_argument("--no-check", action="store_true")
    a = ap.parse_args()
    tensors = to_f16(convert(a.folder))
    save_file(tensors, a.out, metadata={"format": "pt"})
    print(f"wrote {a.out}: {len(tensors)} tensors, {os.path.getsize(a.out)} bytes")
    if not a.no_check:
        check(a.out, os.path.abspath(a.folder))
    return 0


if __name__ == "__main__":
    sys.exit(main())
