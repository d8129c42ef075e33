#!/usr/bin/env python3
"""Builds the tiny evaluation models of `mifo eval` and their parity references.

    python tools/make_tiny_eval_models.py            # writes fixtures/tiny-clip, fixtures/tiny-dino

* `fixtures/tiny-clip/`: a transformers `CLIPModel` (text and vision towers, projections) with a
  tiny byte-level BPE vocabulary, saved with `save_pretrained` (config.json + model.safetensors),
  the tokenizer files and the `CLIPImageProcessor` config (preprocessor_config.json).
* `fixtures/tiny-dino/`: a transformers `ViTModel` without pooler in the facebook/dino-vits16
  layout, plus a `ViTImageProcessor` config with the ImageNet mean/std and bilinear resizing (what
  facebook/dino-vits16 ships).
* `reference.safetensors` in each folder: stored inputs (u8 images, UTF-8 prompts) and what
  transformers computes from them in float32 on CPU: `pixel_values` (the PIL image processors),
  last hidden states, CLIP `image_embeds` / `text_embeds` (projected, not normalised) and the
  DINO CLS feature. `tests/eval_parity.rs` checks mifo against them.

Weights are random with a fixed seed (the library init is replaced, see `reinit`), so outputs are
O(1) and depend on the input. Nothing is downloaded. Needs torch, transformers (5.x), safetensors,
numpy, Pillow.
"""

import json
import os
import sys

import numpy as np
import torch
from safetensors.torch import save_file
from transformers import (
    CLIPConfig,
    CLIPModel,
    CLIPTokenizer,
    ViTConfig,
    ViTModel,
)
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
from transformers.models.vit.image_processing_pil_vit import ViTImageProcessorPil
from PIL import Image

SEED = 909
ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "fixtures")

# Words whose BPE merges the tiny vocabulary contains (the editability prompts of the paper's
# Table 4 and a few more); everything else is encoded byte by byte.
WORDS = (
    "a photo of at the beach in jungle snow street on top pink fabric floating water wooden "
    "floor with city background mountain eiffel tower and cup spoon coin"
).split()

PROMPTS = [
    "a photo of at the beach",
    "a photo of cup and spoon with the Eiffel tower in the background",
    "A  Photo OF the SNOW, 2 coins!",
    "",
]

IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]


def bytes_to_unicode():
    """GPT-2 / CLIP byte -> printable character table."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs]))


def write_tokenizer(folder):
    """vocab.json + merges.txt: 256 byte symbols, the same with `</w>`, left-to-right merges of
    WORDS, then <|startoftext|> and <|endoftext|> (the largest id, as in CLIP)."""
    byte_chars = list(bytes_to_unicode().values())
    vocab = byte_chars + [c + "</w>" for c in byte_chars]
    merges = []
    known = set(vocab)
    for word in WORDS:
        symbols = list(word)
        symbols[-1] += "</w>"
        left = symbols[0]
        for right in symbols[1:]:
            merged = left + right
            if merged not in known:
                merges.append((left, right))
                vocab.append(merged)
                known.add(merged)
            left = merged
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    with open(os.path.join(folder, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump({tok: i for i, tok in enumerate(vocab)}, f, ensure_ascii=False)
    with open(os.path.join(folder, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n")
        for a, b in merges:
            f.write(f"{a} {b}\n")
    with open(os.path.join(folder, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump(
            {
                "tokenizer_class": "CLIPTokenizer",
                "model_max_length": 77,
                "bos_token": "<|startoftext|>",
                "eos_token": "<|endoftext|>",
                "pad_token": "<|endoftext|>",
                "unk_token": "<|endoftext|>",
            },
            f,
            indent=2,
        )
    # Loaded back from the three files (transformers 5 ignores vocab/merges arguments given to
    # the constructor): this is the tokenizer the reference ids come from.
    tok = CLIPTokenizer.from_pretrained(folder)
    if len(tok) != len(vocab):
        raise SystemExit(f"tokenizer has {len(tok)} tokens, the vocabulary {len(vocab)}")
    return tok, len(vocab)


def reinit(model, gen):
    """Every parameter redrawn from one generator: matrices N(0, 1/fan_in), biases N(0, 0.05²),
    1-D norm weights 1 + N(0, 0.1²) and norm biases N(0, 0.1²), embeddings and class/position
    tokens N(0, 0.5²)."""
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if "embedding" in name or "cls_token" in name or name.endswith("class_embedding"):
                if "patch_embed" in name and p.dim() == 4:
                    std = 1.0 / np.sqrt(p[0].numel())
                    p.copy_(torch.randn(p.shape, generator=gen) * std)
                elif name.endswith("bias"):
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
                else:
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
            elif p.dim() >= 2:
                std = 1.0 / np.sqrt(p[0].numel())
                p.copy_(torch.randn(p.shape, generator=gen) * std)
            elif "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + torch.randn(p.shape, generator=gen) * 0.1)
            elif "norm" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
            elif name.endswith("bias"):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
            elif name == "logit_scale":
                p.fill_(float(np.log(1 / 0.07)))
            else:
                raise SystemExit(f"no init rule for {name} {tuple(p.shape)}")


def test_images(rng):
    """Three smooth RGB images with detail: landscape 61x45, portrait 40x72, small 20x20
    (upscaled by both processors)."""
    out = []
    for (w, h) in [(61, 45), (40, 72), (20, 20)]:
        y, x = np.mgrid[0:h, 0:w].astype(np.float64)
        img = np.zeros((h, w, 3))
        for c in range(3):
            fx, fy, ph = rng.uniform(0.05, 0.4), rng.uniform(0.05, 0.4), rng.uniform(0, 6.3)
            img[..., c] = 127.5 + 90 * np.sin(fx * x + ph) * np.cos(fy * y - ph)
        img += rng.normal(0, 18, img.shape)
        out.append(np.clip(np.round(img), 0, 255).astype(np.uint8))
    return out


def main():
    torch.manual_seed(SEED)
    rng = np.random.default_rng(SEED)
    images = test_images(rng)

    # --- CLIP ---
    clip_dir = os.path.join(ROOT, "tiny-clip")
    os.makedirs(clip_dir, exist_ok=True)
    for stale in ("tokenizer.json", "special_tokens_map.json"):
        if os.path.exists(os.path.join(clip_dir, stale)):
            os.remove(os.path.join(clip_dir, stale))
    tok, vocab_size = write_tokenizer(clip_dir)
    cfg = CLIPConfig(
        text_config=dict(
            vocab_size=vocab_size,
            hidden_size=24,
            intermediate_size=40,
            num_hidden_layers=2,
            num_attention_heads=2,
            max_position_embeddings=77,
            hidden_act="quick_gelu",
            layer_norm_eps=1e-5,
            # openai/clip-vit-*: the legacy id 2 (pooling at the argmax id, i.e. <|endoftext|>)
            bos_token_id=0,
            eos_token_id=2,
            pad_token_id=1,
        ),
        vision_config=dict(
            hidden_size=32,
            intermediate_size=56,
            num_hidden_layers=2,
            num_attention_heads=4,
            image_size=32,
            patch_size=8,
            hidden_act="quick_gelu",
            layer_norm_eps=1e-5,
        ),
        projection_dim=16,
    )
    clip = CLIPModel(cfg).eval()
    reinit(clip, torch.Generator().manual_seed(SEED))
    clip.save_pretrained(clip_dir)
    clip_proc = CLIPImageProcessorPil(
        size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}
    )
    clip_proc.save_pretrained(clip_dir)

    ref = {}
    for i, img in enumerate(images):
        ref[f"image_{i}"] = torch.from_numpy(img.copy())
    pil = [Image.fromarray(img) for img in images]
    pixels = torch.from_numpy(np.stack(clip_proc(pil)["pixel_values"])).float()
    ref["pixel_values"] = pixels
    with torch.no_grad():
        vout = clip.vision_model(pixel_values=pixels)
        ref["vision_last_hidden_state"] = vout.last_hidden_state
        ref["image_embeds"] = clip.visual_projection(vout.pooler_output)
        for j, prompt in enumerate(PROMPTS):
            ids = tok(prompt)["input_ids"]
            ids_t = torch.tensor([ids], dtype=torch.long)
            tout = clip.text_model(input_ids=ids_t)
            ref[f"prompt_{j}"] = torch.tensor(list(prompt.encode("utf-8")), dtype=torch.uint8)
            ref[f"input_ids_{j}"] = ids_t[0]
            ref[f"text_last_hidden_state_{j}"] = tout.last_hidden_state[0]
            ref[f"text_embeds_{j}"] = clip.text_projection(tout.pooler_output)[0]
    save_file({k: v.contiguous() for k, v in ref.items()}, os.path.join(clip_dir, "reference.safetensors"))

    # --- DINO (ViTModel, facebook/dino-vits16 layout) ---
    dino_dir = os.path.join(ROOT, "tiny-dino")
    os.makedirs(dino_dir, exist_ok=True)
    vcfg = ViTConfig(
        hidden_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=80,
        hidden_act="gelu",
        layer_norm_eps=1e-6,
        image_size=32,
        patch_size=8,
        num_channels=3,
        qkv_bias=True,
    )
    dino = ViTModel(vcfg, add_pooling_layer=False).eval()
    reinit(dino, torch.Generator().manual_seed(SEED + 1))
    dino.save_pretrained(dino_dir)
    dino_proc = ViTImageProcessorPil(
        size={"height": 32, "width": 32},
        resample=2,
        image_mean=IMAGENET_MEAN,
        image_std=IMAGENET_STD,
    )
    dino_proc.save_pretrained(dino_dir)
    ref = {}
    for i, img in enumerate(images):
        ref[f"image_{i}"] = torch.from_numpy(img.copy())
    pixels = torch.from_numpy(np.stack(dino_proc(pil)["pixel_values"])).float()
    ref["pixel_values"] = pixels
    with torch.no_grad():
        out = dino(pixel_values=pixels)
        ref["last_hidden_state"] = out.last_hidden_state
        ref["cls"] = out.last_hidden_state[:, 0]
    save_file({k: v.contiguous() for k, v in ref.items()}, os.path.join(dino_dir, "reference.safetensors"))

    for d in (clip_dir, dino_dir):
        total = sum(os.path.getsize(os.path.join(d, f)) for f in os.listdir(d))
        print(f"{os.path.relpath(d)}: {len(os.listdir(d))} files, {total} bytes")
        if total > 1 << 20:
            sys.exit(f"{d} is over 1 MiB")


if __name__ == "__main__":
    main()
