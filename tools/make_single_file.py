#!/usr/bin/env python3
"""Convert the bundled diffusers folder fixtures/tiny-sd21 to one single-file checkpoint in the
original Stable Diffusion 2.x layout (as A1111 and ComfyUI keep them), then check the file
independently with diffusers' own single-file loader.

    python tools/make_single_file.py            # writes fixtures/tiny-sd21-single.safetensors

The mapping diffusers -> original is written out here (not taken from diffusers):

* UNet  -> `model.diffusion_model.*`: `input_blocks` (conv_in, then per level L ResNets `.0`
  with their attention `.1`, then the downsampler `.0.op`), `middle_block.{0,1,2}`,
  `output_blocks` (per level L+1 ResNets `.0`, attention `.1`, upsampler `.1.conv` or `.2.conv`
  after an attention), `time_embed.{0,2}`, `out.{0,2}`; ResNets `in_layers.{0,2}`,
  `emb_layers.1`, `out_layers.{0,3}`, `skip_connection`.
* VAE   -> `first_stage_model.*`: `encoder.down.I.block.J`, `decoder.up.I` numbered from the
  lowest resolution (diffusers' up_blocks reversed), `mid.block_{1,2}`, `mid.attn_1` with q/k/v
  and proj_out as 1x1 convolutions [C, C, 1, 1], `norm_out`, `nin_shortcut`.
* text  -> `cond_stage_model.model.*` (OpenCLIP): `token_embedding`, `positional_embedding`,
  `transformer.resblocks.N` with q/k/v fused into `attn.in_proj_weight` / `in_proj_bias`,
  `ln_1`, `ln_2`, `mlp.c_fc`, `mlp.c_proj`, `ln_final`. Like a real SD 2.x file it holds one
  more block than the diffusers text encoder uses (SD 2.x reads the penultimate layer; that
  block is random here) and OpenCLIP's `text_projection` and `logit_scale`.
* plus the DDPM schedule buffers `betas` / `alphas_cumprod` that original checkpoints carry.

Check: diffusers 0.42.1 `StableDiffusionPipeline.from_single_file(file, config=<folder>)` must
give every UNet / VAE / text-encoder tensor of the folder bit for bit, and the same UNet, VAE
and text-encoder outputs on seeded inputs.
"""

import argparse
import math
import os
import re
import sys

import torch
from safetensors.torch import load_file, save_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESNET = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}


def unet_key(name, layers, attn_levels_up):
    """diffusers UNet2DConditionModel name -> original `model.diffusion_model.` name."""
    per = layers + 1
    fixed = {
        # SDXL's added conditioning (pooled text + time ids): `label_emb` in the original.
        "add_embedding.linear_1.": "label_emb.0.0.",
        "add_embedding.linear_2.": "label_emb.0.2.",
        "conv_in.": "input_blocks.0.0.",
        "time_embedding.linear_1.": "time_embed.0.",
        "time_embedding.linear_2.": "time_embed.2.",
        "conv_norm_out.": "out.0.",
        "conv_out.": "out.2.",
        "mid_block.attentions.0.": "middle_block.1.",
    }
    for a, b in fixed.items():
        if name.startswith(a):
            return b + name[len(a):]

    def resnet(tail):
        module, param = tail.split(".", 1)
        return f"{RESNET[module]}.{param}"

    m = re.match(r"mid_block\.resnets\.(\d)\.(.*)", name)
    if m:
        return f"middle_block.{2 * int(m[1])}.{resnet(m[2])}"
    m = re.match(r"down_blocks\.(\d+)\.(resnets|attentions|downsamplers)\.(\d+)\.(.*)", name)
    if m:
        level, kind, j, tail = int(m[1]), m[2], int(m[3]), m[4]
        if kind == "resnets":
            return f"input_blocks.{1 + level * per + j}.0.{resnet(tail)}"
        if kind == "attentions":
            return f"input_blocks.{1 + level * per + j}.1.{tail}"
        return f"input_blocks.{1 + level * per + layers}.0.op.{tail.removeprefix('conv.')}"
    m = re.match(r"up_blocks\.(\d+)\.(resnets|attentions|upsamplers)\.(\d+)\.(.*)", name)
    if m:
        level, kind, j, tail = int(m[1]), m[2], int(m[3]), m[4]
        if kind == "resnets":
            return f"output_blocks.{level * per + j}.0.{resnet(tail)}"
        if kind == "attentions":
            return f"output_blocks.{level * per + j}.1.{tail}"
        sub = 2 if attn_levels_up[level] else 1
        return f"output_blocks.{level * per + layers}.{sub}.{tail}"
    raise KeyError(f"unet: no mapping for {name}")


def vae_key(name, levels):
    """diffusers AutoencoderKL name -> (original `first_stage_model.` name, squeeze to 1x1)."""
    for same in ("encoder.conv_in.", "encoder.conv_out.", "decoder.conv_in.",
                 "decoder.conv_out.", "quant_conv.", "post_quant_conv."):
        if name.startswith(same):
            return name, False
    side, rest = name.split(".", 1)
    if rest.startswith("conv_norm_out."):
        return f"{side}.norm_out.{rest[len('conv_norm_out.'):]}", False

    def resnet(tail):
        module, param = tail.split(".", 1)
        return f"{'nin_shortcut' if module == 'conv_shortcut' else module}.{param}"

    m = re.match(r"mid_block\.resnets\.(\d)\.(.*)", rest)
    if m:
        return f"{side}.mid.block_{int(m[1]) + 1}.{resnet(m[2])}", False
    m = re.match(r"mid_block\.attentions\.0\.(group_norm|to_q|to_k|to_v|to_out\.0)\.(.*)", rest)
    if m:
        module = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v",
                  "to_out.0": "proj_out"}[m[1]]
        return f"{side}.mid.attn_1.{module}.{m[2]}", module != "norm" and m[2] == "weight"
    m = re.match(r"down_blocks\.(\d+)\.resnets\.(\d+)\.(.*)", rest)
    if m:
        return f"{side}.down.{m[1]}.block.{m[2]}.{resnet(m[3])}", False
    m = re.match(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.*)", rest)
    if m:
        return f"{side}.down.{m[1]}.downsample.conv.{m[2]}", False
    m = re.match(r"up_blocks\.(\d+)\.resnets\.(\d+)\.(.*)", rest)
    if m:
        return f"{side}.up.{levels - 1 - int(m[1])}.block.{m[2]}.{resnet(m[3])}", False
    m = re.match(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.*)", rest)
    if m:
        return f"{side}.up.{levels - 1 - int(m[1])}.upsample.conv.{m[2]}", False
    raise KeyError(f"vae: no mapping for {name}")


def open_clip(te, hidden, seed, sd2=True):
    """transformers CLIPTextModel tensors -> OpenCLIP names, q/k/v fused. For SD 2.x (`sd2`) one
    extra block and a random projection are added (see below); otherwise (SDXL's second encoder,
    a CLIPTextModelWithProjection) every block is the model's and `text_projection` is its
    `text_projection.weight` transposed ([hidden, projection], applied as `x @ P`)."""
    te = {k.removeprefix("text_model."): v for k, v in te.items()}
    projection = te.pop("text_projection.weight", None)
    out = {
        "token_embedding.weight": te.pop("embeddings.token_embedding.weight"),
        "positional_embedding": te.pop("embeddings.position_embedding.weight"),
        "ln_final.weight": te.pop("final_layer_norm.weight"),
        "ln_final.bias": te.pop("final_layer_norm.bias"),
    }
    layers = sorted({int(k.split(".")[2]) for k in te if k.startswith("encoder.layers.")})
    names = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "self_attn.out_proj": "attn.out_proj",
             "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}
    for n in layers:
        p = f"encoder.layers.{n}."
        for param in ("weight", "bias"):
            out[f"transformer.resblocks.{n}.attn.in_proj_{param}"] = torch.cat(
                [te.pop(f"{p}self_attn.{q}_proj.{param}") for q in "qkv"], 0)
            for a, b in names.items():
                out[f"transformer.resblocks.{n}.{b}.{param}"] = te.pop(f"{p}{a}.{param}")
    assert not te, f"text encoder tensors left unmapped: {sorted(te)}"
    if not sd2:
        out["text_projection"] = projection.T
        out["logit_scale"] = torch.tensor(math.log(1 / 0.07))
        return out
    # The block after the last one the diffusers model uses (SD 2.x stops at the penultimate),
    # and OpenCLIP's projection and temperature: present in real files, unused by the pipeline.
    g = torch.Generator().manual_seed(seed)
    last = len(layers)
    for k in [k for k in out if k.startswith("transformer.resblocks.0.")]:
        shape = out[k].shape
        new = k.replace("resblocks.0.", f"resblocks.{last}.")
        out[new] = torch.randn(shape, generator=g) * (1.0 / math.sqrt(shape[-1]) if len(shape) > 1 else 0.05)
    out["text_projection"] = torch.randn((hidden, hidden), generator=g) / math.sqrt(hidden)
    out["logit_scale"] = torch.tensor(math.log(1 / 0.07))
    return out


def convert(folder):
    import json

    unet = load_file(os.path.join(folder, "unet/diffusion_pytorch_model.safetensors"))
    vae = load_file(os.path.join(folder, "vae/diffusion_pytorch_model.safetensors"))
    te = load_file(os.path.join(folder, "text_encoder/model.safetensors"))
    ucfg = json.load(open(os.path.join(folder, "unet/config.json")))
    vcfg = json.load(open(os.path.join(folder, "vae/config.json")))
    tcfg = json.load(open(os.path.join(folder, "text_encoder/config.json")))
    attn_up = [t.startswith("CrossAttn") for t in ucfg["up_block_types"]]
    out = {}
    for k, v in unet.items():
        out["model.diffusion_model." + unet_key(k, ucfg["layers_per_block"], attn_up)] = v
    levels = len(vcfg["block_out_channels"])
    for k, v in vae.items():
        name, conv = vae_key(k, levels)
        out["first_stage_model." + name] = v[:, :, None, None] if conv else v
    for k, v in open_clip(te, tcfg["hidden_size"], 2026).items():
        out["cond_stage_model.model." + k] = v
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
    out["betas"] = betas.float()
    out["alphas_cumprod"] = torch.cumprod(1 - betas, 0).float()
    # q/k/v fused (16 -> 12 tensors per layer), one extra block (12), projection, scale, 2 buffers
    assert len(out) == len(unet) + len(vae) + len(te) - 4 * tcfg["num_hidden_layers"] + 12 + 2 + 2
    return {k: v.contiguous() for k, v in out.items()}


def check(path, folder):
    """Independent check: diffusers' single-file loader on our file against the folder."""
    from diffusers import StableDiffusionPipeline

    ours = StableDiffusionPipeline.from_single_file(path, config=folder, local_files_only=True,
                                                    safety_checker=None)
    ref = StableDiffusionPipeline.from_pretrained(folder, local_files_only=True, safety_checker=None)
    worst, counts = 0.0, []
    for part in ("unet", "vae", "text_encoder"):
        a, b = getattr(ours, part).state_dict(), getattr(ref, part).state_dict()
        counts.append(f"{len(b)} {part}")
        assert a.keys() == b.keys(), (part, sorted(a.keys() ^ b.keys())[:5])
        for k in b:
            d = (a[k].float() - b[k].float()).abs().max().item() if b[k].numel() else 0.0
            worst = max(worst, d)
            assert d == 0.0, f"{part}.{k} differs by {d}"
    print(f"state dicts: {', '.join(counts)} tensors, all identical (max |diff| {worst})")
    g = torch.Generator().manual_seed(0)
    ucfg = ref.unet.config
    lat = torch.randn((1, ucfg.in_channels, ucfg.sample_size, ucfg.sample_size), generator=g)
    ids = ref.tokenizer(["a photo of a cat"], padding="max_length", max_length=77,
                        return_tensors="pt").input_ids
    img = torch.rand((1, 3, 64, 64), generator=g) * 2 - 1
    with torch.no_grad():
        ta = ours.text_encoder(ids)[0]
        tb = ref.text_encoder(ids)[0]
        ua = ours.unet(lat, 500, encoder_hidden_states=tb).sample
        ub = ref.unet(lat, 500, encoder_hidden_states=tb).sample
        va = ours.vae.encode(img).latent_dist.mean
        vb = ref.vae.encode(img).latent_dist.mean
        da = ours.vae.decode(va).sample
        db = ref.vae.decode(vb).sample
    for name, x, y in (("text", ta, tb), ("unet", ua, ub), ("vae.encode", va, vb), ("vae.decode", da, db)):
        d = (x - y).abs().max().item()
        print(f"{name:10} max |diff| {d:.3e}")
        assert d == 0.0, name


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--folder", default=os.path.join(ROOT, "fixtures/tiny-sd21"))
    ap.add_argument("--out", default=os.path.join(ROOT, "fixtures/tiny-sd21-single.safetensors"))
    ap.add_argument("--no-check", action="store_true")
    a = ap.parse_args()
    tensors = convert(a.folder)
    save_file(tensors, a.out, metadata={"format": "pt"})
    print(f"wrote {a.out}: {len(tensors)} tensors, {os.path.getsize(a.out)} bytes")
    if not a.no_check:
        check(a.out, os.path.abspath(a.folder))
    return 0


if __name__ == "__main__":
    sys.exit(main())
