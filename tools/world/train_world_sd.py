#!/usr/bin/env python3
"""Train the world's base model (fixtures/world-sd/) from scratch on the world's images.

The data set comes from mifo itself, so the scenes the model learns are drawn by the same code
that draws the scenes users learn from:

    cargo run --release -- world dataset --count 100000 --seed 0 /tmp/world-data
    python tools/world/train_world_sd.py --data /tmp/world-data --out fixtures/world-sd

Two stages, one process:
1. An f = 8 AutoencoderKL (4 levels 32/64/64/64, 4 latent channels) on the images: MSE plus a
   small KL term. Its scaling factor is 1 / std of the posterior means.
2. The latents are encoded once (posterior mean and std; each step samples from them). A small
   UNet2DConditionModel on the 8x8 latents (levels 32/64/64, cross-attention at 8x8 and 4x4 in
   both halves and in the 2x2 middle block) and a 2-layer CLIP text encoder with the real CLIP
   vocabulary are trained together: epsilon prediction, min-SNR-5 weights, 10 % empty captions
   (for classifier-free guidance), AdamW with warm-up and cosine decay, EMA of both.

Cross-attention localisation (`--loc-weight`, on by default): a big Stable Diffusion puts a
word's cross-attention on the thing the word names, and MIFO (its attention reward and penalty,
box control) relies on that. A tiny model trained only on the diffusion loss does not: its
cross-attention stays spread over the whole image (measured: the maps of "red" and "blue" are
flat), so nothing that acts on attention has a grip. The world model gets the property SD has
by supervision: in every cross-attention layer, for each object the caption names, the share of
its colour word's and its shape word's attention mass that falls on the object's exact mask
(`labels.u8`, area-averaged to the layer's size) is pushed up: L_loc = mean(1 - share), added
with weight `--loc-weight`. Empty captions (the CFG dropout) have no such term.

Box-mask grounding (`--box-mask-p`, stage 3): MIFO's synthesis steers a layout by masking
attention inside boxes (box control: a subject's words visible only inside its box, stop words
hidden, EOS hidden from the background, and self-attention kept within each box and the
background). A big Stable Diffusion follows such masks because content enters the image
through the words' cross-attention; the tiny model, even localised, forms objects from the
prompt's pooled content (EOS and padding) and the early noise, wherever they happen to grow
(measured: with two boxes on plain words, the unbiased attention of the boxed words ended
~100 % outside the boxes, and the objects with it). With probability `--box-mask-p` a training
sample is denoised under exactly those masks, built from its objects' bounding boxes (each side
pushed out by 0-2 px at random, rounded to each layer's grid as mifo rounds boxes), so the model
learns what a large one knows: content goes where its words are allowed. The other samples
train as before (localisation term included), so plain prompts keep their quality.

The result is saved with StableDiffusionPipeline.save_pretrained (DDIM scheduler as SD 2.1
ships it, the SD 2.1 CLIP tokenizer files of fixtures/tiny-sd21/tokenizer), f32 safetensors.
Requires torch, diffusers and transformers (CPU is enough; see fixtures/world-sd/README.md for
the versions, the seed, the steps and the time this took).
"""

import argparse
import copy
import json
import math
import os
import shutil
import time

import numpy as np
import torch
import torch.nn.functional as F

from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    DDPMScheduler,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
TOKENIZER_SRC = os.path.join(REPO, "fixtures", "tiny-sd21", "tokenizer")


def load_data(folder):
    info = json.load(open(os.path.join(folder, "dataset.json")))
    n, s = info["count"], info["size"]
    raw = np.fromfile(os.path.join(folder, "images.u8"), dtype=np.uint8)
    images = raw.reshape(n, s, s, 3)
    labels = np.fromfile(os.path.join(folder, "labels.u8"), dtype=np.uint8).reshape(n, s, s)
    captions = open(os.path.join(folder, "captions.txt")).read().splitlines()
    assert len(captions) == n, "captions.txt and images.u8 disagree"
    return images, labels, captions, info


COLOUR_WORDS = ("red", "green", "blue", "yellow")
SHAPE_WORDS = ("circle", "square", "triangle")


def word_positions(tok, all_ids):
    """[N, 2 objects, 2 words] token positions of each named object's colour and shape word
    (-1 where the caption names fewer objects): the k-th colour word and the k-th shape word of
    a caption belong to the k-th object it names, the object labelled k + 1."""
    colour_ids = {tok.convert_tokens_to_ids(w + "</w>") for w in COLOUR_WORDS}
    shape_ids = {tok.convert_tokens_to_ids(w + "</w>") for w in SHAPE_WORDS}
    pos = np.full((len(all_ids), 2, 2), -1, dtype=np.int64)
    ids = all_ids.numpy()
    for n in range(len(ids)):
        c = [i for i, t in enumerate(ids[n]) if t in colour_ids]
        s = [i for i, t in enumerate(ids[n]) if t in shape_ids]
        for k in range(min(2, len(c), len(s))):
            pos[n, k] = (c[k], s[k])
    return torch.from_numpy(pos)


class StoreAttention:
    """attn1/attn2 processor: diffusers' AttnProcessor arithmetic (explicit softmax) with an
    additive box-control mask per batch item when the store holds one for this layer's size
    (`store["sa"][n]` [B, n, n] for self-attention, `store["ca"][n]` [B, n, 77] for
    cross-attention; 0 or the dtype's minimum), and, for cross-attention, the head-mean
    probabilities [B, queries, keys] kept in `store["maps"]` while `store["on"]` is set."""

    def __init__(self, store, cross):
        self.store = store
        self.cross = cross

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        assert hidden_states.ndim == 3 and attn.group_norm is None and attn.spatial_norm is None
        b, n, _ = hidden_states.shape
        ctx = encoder_hidden_states if self.cross else hidden_states
        query = attn.head_to_batch_dim(attn.to_q(hidden_states))
        key = attn.head_to_batch_dim(attn.to_k(ctx))
        value = attn.head_to_batch_dim(attn.to_v(ctx))
        bias = self.store.get("ca" if self.cross else "sa", {}).get(n)
        if bias is not None:
            bias = bias.repeat_interleave(attn.heads, 0)
        probs = attn.get_attention_scores(query, key, bias)
        if self.cross and self.store["on"]:
            self.store["maps"].append(probs.view(b, attn.heads, n, -1).mean(1))
        out = attn.batch_to_head_dim(torch.bmm(probs, value))
        out = attn.to_out[1](attn.to_out[0](out))
        if attn.residual_connection:
            out = out + hidden_states
        return out / attn.rescale_output_factor


def capture_cross_attention(unet, store):
    unet.set_attn_processor({name: StoreAttention(store, ".attn2." in name) for name in unet.attn_processors})


def object_boxes(labels):
    """[N, 2, 4] pixel boxes (x0, y0, x1, y1; end exclusive) of objects 1 and 2; -1 where absent."""
    out = np.full((labels.shape[0], 2, 4), -1, dtype=np.int64)
    idx = np.arange(labels.shape[-1])
    for k in range(2):
        m = labels == k + 1
        rows, cols = m.any(2), m.any(1)
        present = rows.any(1)
        big = labels.shape[-1] + 1
        out[present, k, 0] = np.where(cols, idx, big).min(1)[present]
        out[present, k, 1] = np.where(rows, idx, big).min(1)[present]
        out[present, k, 2] = np.where(cols, idx, -1).max(1)[present] + 1
        out[present, k, 3] = np.where(rows, idx, -1).max(1)[present] + 1
    return out


def box_regions(boxes, size, res):
    """[B, 2, res*res] bool: each box on a res x res grid, its edges rounded half-even as mifo's
    `box_mask` rounds them; absent boxes (-1) are empty."""
    b = boxes.shape[0]
    out = np.zeros((b, 2, res, res), dtype=bool)
    edges = np.round(boxes.astype(np.float64) / size * res).astype(np.int64)
    for i in range(b):
        for k in range(2):
            if boxes[i, k, 0] < 0:
                continue
            x0, y0, x1, y1 = edges[i, k]
            out[i, k, y0:y1, x0:x1] = True
    return torch.from_numpy(out.reshape(b, 2, res * res))


def box_control_masks(boxes, masked, cond, ids, pos, stop_ids, resolutions, size):
    """The additive masks of mifo's box control for a batch (module doc): self-attention for the
    `masked` items, cross-attention for the `masked & cond` items; others get zeros."""
    neg = torch.finfo(torch.float32).min
    sa, ca = {}, {}
    eos = (ids == 49407).int().argmax(1)
    stop = torch.zeros_like(ids, dtype=torch.bool)
    for t in stop_ids:
        stop |= ids == t
    b, m = ids.shape
    for res in resolutions:
        n = res * res
        reg = box_regions(boxes, size, res)  # [B, 2, n]
        bg = ~reg.any(1)  # [B, n]
        shared = torch.einsum("bkq,bkm->bqm", reg.float(), reg.float()) > 0
        allowed = bg[:, :, None] | bg[:, None, :] | shared
        allowed |= ~masked[:, None, None]
        sa[n] = torch.where(allowed, 0.0, neg)
        ca_ok = torch.ones((b, n, m), dtype=torch.bool)
        ca_ok &= ~stop[:, None, :]
        rows = torch.arange(b)
        for k in range(2):
            for w in range(2):
                p = pos[:, k, w]
                has = p >= 0
                col = ca_ok[rows, :, p.clamp(min=0)]
                ca_ok[rows, :, p.clamp(min=0)] = torch.where(has[:, None], reg[:, k], col)
        eos_col = ca_ok[rows, :, eos]
        ca_ok[rows, :, eos] = eos_col & ~bg
        ca_ok |= ~(masked & cond)[:, None, None]
        ca[n] = torch.where(ca_ok, 0.0, neg)
    return sa, ca


def localisation_loss(maps, labels, pos, keep):
    """mean(1 - share) over every captured layer, named object and word: `share` is the part of
    the word's attention mass on the object's mask (area-averaged to the layer's size).
    labels [B, H, W] (0 background, k + 1 object k), pos [B, 2, 2], keep [B] (caption kept)."""
    total, count = 0.0, 0
    size = labels.shape[-1]
    rows = torch.arange(labels.shape[0])
    masks = {}
    for a in maps:
        res = int(round(math.sqrt(a.shape[1])))
        if res not in masks:
            obj = torch.stack([(labels == k + 1).float() for k in range(2)], 1)
            masks[res] = F.avg_pool2d(obj, size // res).flatten(2)  # [B, 2, res*res]
        m = masks[res]
        for k in range(2):
            for w in range(2):
                p = pos[:, k, w]
                valid = (p >= 0) & keep
                if not valid.any():
                    continue
                att = a[rows, :, p.clamp(min=0)]  # [B, res*res]
                share = (att * m[:, k]).sum(1) / (att.sum(1) + 1e-8)
                total = total + ((1 - share) * valid).sum()
                count += int(valid.sum())
    if count == 0:
        return None
    return total / count


def to_tensor(batch_u8):
    x = torch.from_numpy(batch_u8).permute(0, 3, 1, 2).float()
    return x / 127.5 - 1.0


def lr_at(step, total, base, warmup, time_share=0.0):
    """Linear warm-up, then cosine decay to 0 over `total` steps or over the time budget,
    whichever ends first (`time_share` = elapsed / budget)."""
    if step < warmup:
        return base * (step + 1) / warmup
    p = max((step - warmup) / max(1, total - warmup), time_share)
    return base * 0.5 * (1.0 + math.cos(math.pi * min(1.0, p)))


def make_vae(size):
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D"] * 4,
        up_block_types=["UpDecoderBlock2D"] * 4,
        block_out_channels=[32, 64, 64, 64],
        layers_per_block=1,
        act_fn="silu",
        latent_channels=4,
        norm_num_groups=16,
        sample_size=size,
        scaling_factor=1.0,
    )


def make_text_encoder(hidden):
    cfg = CLIPTextConfig(
        vocab_size=49408,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,
        hidden_act="gelu",
        projection_dim=hidden,
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=0,
    )
    return CLIPTextModel(cfg)


def make_unet(latent, text_hidden):
    return UNet2DConditionModel(
        sample_size=latent,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        mid_block_type="UNetMidBlock2DCrossAttn",
        block_out_channels=(32, 64, 64),
        layers_per_block=1,
        norm_num_groups=16,
        cross_attention_dim=text_hidden,
        attention_head_dim=(2, 4, 4),
        use_linear_projection=True,
    )


def ema_update(ema, model, decay):
    with torch.no_grad():
        for pe, pm in zip(ema.parameters(), model.parameters()):
            pe.mul_(decay).add_(pm.detach(), alpha=1.0 - decay)


def log(msg, logf):
    line = f"[{time.strftime('%H:%M:%S')}] {msg}"
    print(line, flush=True)
    logf.write(line + "\n")
    logf.flush()


def train_vae(images, args, logf):
    torch.manual_seed(args.seed)
    vae = make_vae(images.shape[1])
    opt = torch.optim.AdamW(vae.parameters(), lr=args.vae_lr, weight_decay=0.0)
    rng = np.random.default_rng(args.seed)
    t0 = time.time()
    for step in range(args.vae_steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, args.vae_steps, args.vae_lr, 50)
        idx = rng.integers(0, len(images), args.batch)
        x = to_tensor(images[idx])
        post = vae.encode(x).latent_dist
        z = post.sample()
        rec = vae.decode(z).sample
        mse = F.mse_loss(rec, x)
        kl = post.kl().mean() / z[0].numel()
        loss = mse + args.vae_kl * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 50 == 0 or step == args.vae_steps - 1:
            psnr = 10 * math.log10(4.0 / max(mse.item(), 1e-10))
            log(f"vae {step}/{args.vae_steps} mse {mse.item():.5f} psnr {psnr:.2f} dB kl {kl.item():.3f} ({time.time() - t0:.0f} s)", logf)
    vae.eval()
    return vae


@torch.no_grad()
def encode_all(vae, images, batch=256):
    means, stds = [], []
    for i in range(0, len(images), batch):
        post = vae.encode(to_tensor(images[i : i + batch])).latent_dist
        means.append(post.mean)
        stds.append(post.std)
    return torch.cat(means), torch.cat(stds)


def tokenize(tok, captions):
    return tok(captions, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids


@torch.no_grad()
def sample_grid(unet, te, vae, tok, scale, prompts, path, seed=0, steps=25, cfg=6.0):
    from PIL import Image

    sched = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                          clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    sched.set_timesteps(steps)
    g = torch.Generator().manual_seed(seed)
    n = len(prompts)
    cond = te(tokenize(tok, prompts))[0]
    uncond = te(tokenize(tok, [""] * n))[0]
    lat = torch.randn((n, 4, 8, 8), generator=g)
    for t in sched.timesteps:
        eps = unet(torch.cat([lat, lat]), t, encoder_hidden_states=torch.cat([uncond, cond])).sample
        eu, ec = eps.chunk(2)
        lat = sched.step(eu + cfg * (ec - eu), t, lat).prev_sample
    img = ((vae.decode(lat / scale).sample / 2 + 0.5).clamp(0, 1) * 255).round().byte()
    img = img.permute(0, 2, 3, 1).numpy()
    cols = 8
    rows = (n + cols - 1) // cols
    s = img.shape[1]
    grid = np.full((rows * s, cols * s, 3), 255, np.uint8)
    for i in range(n):
        r, c = divmod(i, cols)
        grid[r * s : (r + 1) * s, c * s : (c + 1) * s] = img[i]
    Image.fromarray(grid).resize((cols * s * 2, rows * s * 2), Image.NEAREST).save(path)


PREVIEW_PROMPTS = [
    "a photo of a red circle", "a photo of a blue square", "a photo of a green triangle",
    "a photo of a yellow circle", "a photo of a red square", "a photo of a blue triangle",
    "a photo of a green circle", "a photo of a yellow triangle",
    "a photo of a red circle and a blue circle", "a photo of a green square and a yellow square",
    "a photo of a blue triangle and a blue circle", "a photo of a red triangle and a green circle",
    "a photo of a yellow square and a red circle", "a photo of a blue square and a green triangle",
    "a photo of a red circle and a red square", "a photo of a yellow triangle and a blue triangle",
]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True, help="folder written by `mifo world dataset`")
    ap.add_argument("--out", required=True, help="the pipeline folder to write")
    ap.add_argument("--work", default="/tmp/world-train", help="checkpoints, previews, log")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--vae-steps", type=int, default=600)
    ap.add_argument("--vae-lr", type=float, default=1e-3)
    ap.add_argument("--vae-kl", type=float, default=1e-4)
    ap.add_argument("--unet-minutes", type=float, default=60.0, help="stop stage 2 after this long")
    ap.add_argument("--unet-steps", type=int, default=13000, help="length of the lr schedule")
    ap.add_argument("--lr", type=float, default=6e-4)
    ap.add_argument("--warmup", type=int, default=300)
    ap.add_argument("--ema", type=float, default=0.999)
    ap.add_argument("--text-hidden", type=int, default=64)
    ap.add_argument("--drop", type=float, default=0.1, help="share of empty captions")
    ap.add_argument("--min-snr", type=float, default=5.0)
    ap.add_argument("--loc-weight", type=float, default=0.1, help="weight of the cross-attention localisation loss (0: off)")
    ap.add_argument("--box-mask-p", type=float, default=0.0, help="share of samples denoised under box-control masks (stage 3; 0: off)")
    ap.add_argument("--box-jitter", type=int, default=2, help="each box side pushed out by 0..this many pixels")
    ap.add_argument("--vae", help="reuse a trained VAE folder (skips stage 1)")
    ap.add_argument("--init", help="continue from a pipeline folder: its VAE (stage 1 skipped), UNet and text encoder")
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    os.makedirs(args.work, exist_ok=True)
    logf = open(os.path.join(args.work, "train.log"), "a")
    log(f"args {vars(args)}; torch {torch.__version__}", logf)
    images, labels, captions, info = load_data(args.data)
    log(f"data {info}", logf)
    started = time.time()

    if args.init:
        vae = AutoencoderKL.from_pretrained(os.path.join(args.init, "vae")).eval()
        vae.register_to_config(scaling_factor=1.0)
    elif args.vae:
        vae = AutoencoderKL.from_pretrained(args.vae).eval()
    else:
        vae = train_vae(images, args, logf)
        vae.save_pretrained(os.path.join(args.work, "vae"))
    vae_minutes = (time.time() - started) / 60
    for p in vae.parameters():
        p.requires_grad_(False)

    t0 = time.time()
    mean, std = encode_all(vae, images)
    scale = float(1.0 / mean.std())
    vae.register_to_config(scaling_factor=scale)
    log(f"encoded {len(mean)} latents in {time.time() - t0:.0f} s; latent std {mean.std():.4f} -> scaling_factor {scale:.5f}", logf)

    tok = CLIPTokenizer.from_pretrained(TOKENIZER_SRC)
    all_ids = tokenize(tok, captions)
    empty_ids = tokenize(tok, [""])[0]
    positions = word_positions(tok, all_ids)
    boxes = object_boxes(labels) if args.box_mask_p > 0 else None
    stop_ids = [tok.convert_tokens_to_ids(w + "</w>") for w in ("a", "of", "and")]

    torch.manual_seed(args.seed + 1)
    if args.init:
        te = CLIPTextModel.from_pretrained(os.path.join(args.init, "text_encoder"))
        unet = UNet2DConditionModel.from_pretrained(os.path.join(args.init, "unet"))
        te.train()
        unet.train()
    else:
        te = make_text_encoder(args.text_hidden)
        unet = make_unet(mean.shape[-1], args.text_hidden)
    n_unet = sum(p.numel() for p in unet.parameters())
    n_te = sum(p.numel() for p in te.parameters())
    log(f"unet {n_unet / 1e6:.2f} M parameters, text encoder {n_te / 1e6:.2f} M (of which embeddings {49408 * args.text_hidden / 1e6:.2f} M)", logf)
    store = {"on": False, "maps": []}
    if args.loc_weight > 0 or args.box_mask_p > 0:
        capture_cross_attention(unet, store)
    ema_unet, ema_te = copy.deepcopy(unet).eval(), copy.deepcopy(te).eval()
    params = list(unet.parameters()) + list(te.parameters())
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=1e-2)
    noise_sched = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000)
    abar = noise_sched.alphas_cumprod
    snr = abar / (1 - abar)
    rng = np.random.default_rng(args.seed + 2)

    t0 = time.time()
    step = 0
    run_avg = None
    loc_avg = None
    size = images.shape[1]
    latent = mean.shape[-1]
    resolutions = [latent >> i for i in range(len(unet.config.block_out_channels))]
    while step < args.unet_steps and (time.time() - t0) < args.unet_minutes * 60:
        lr = lr_at(step, args.unet_steps, args.lr, args.warmup, (time.time() - t0) / (args.unet_minutes * 60))
        for g in opt.param_groups:
            g["lr"] = lr
        idx = rng.integers(0, len(images), args.batch)
        idx_t = torch.from_numpy(idx)
        z0 = (mean[idx_t] + std[idx_t] * torch.randn_like(mean[idx_t])) * scale
        ids = all_ids[idx_t].clone()
        drop = torch.from_numpy(rng.random(args.batch) < args.drop)
        ids[drop] = empty_ids
        noise = torch.randn_like(z0)
        t = torch.randint(0, 1000, (args.batch,))
        zt = noise_sched.add_noise(z0, noise, t)
        cond = te(ids)[0]
        masked = torch.from_numpy(rng.random(args.batch) < args.box_mask_p)
        if args.box_mask_p > 0:
            bx = boxes[idx].copy()
            grow = rng.integers(0, args.box_jitter + 1, bx.shape)
            bx[..., :2] -= grow[..., :2]
            bx[..., 2:] += grow[..., 2:]
            bx = np.where(boxes[idx] < 0, -1, np.clip(bx, 0, size))
            store["sa"], store["ca"] = box_control_masks(
                bx, masked, ~drop, ids, positions[idx_t], stop_ids, resolutions, size)
        store["on"], store["maps"] = args.loc_weight > 0, []
        eps = unet(zt, t, encoder_hidden_states=cond).sample
        store["on"] = False
        store.pop("sa", None)
        store.pop("ca", None)
        w = torch.clamp(snr[t], max=args.min_snr) / snr[t]
        per = ((eps - noise) ** 2).mean(dim=(1, 2, 3))
        loss = (w * per).mean()
        loc = None
        if args.loc_weight > 0:
            lab = torch.from_numpy(labels[idx].astype(np.int64))
            loc = localisation_loss(store["maps"], lab, positions[idx_t], ~drop & ~masked)
            if loc is not None:
                loss = loss + args.loc_weight * loc
            store["maps"] = []
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        warm_ema = args.ema if (step > 500 or args.init) else 0.0
        ema_update(ema_unet, unet, warm_ema)
        ema_update(ema_te, te, warm_ema)
        run_avg = loss.item() if run_avg is None else 0.98 * run_avg + 0.02 * loss.item()
        if loc is not None:
            loc_avg = loc.item() if loc_avg is None else 0.98 * loc_avg + 0.02 * loc.item()
        step += 1
        if step % 100 == 0:
            el = time.time() - t0
            loc_text = f" loc {loc_avg:.3f}" if loc_avg is not None else ""
            log(f"unet {step} loss {run_avg:.4f}{loc_text} lr {lr:.2e} ({el:.0f} s, {el / step:.3f} s/step)", logf)
        if step % 2000 == 0:
            sample_grid(ema_unet, ema_te, vae, tok, scale, PREVIEW_PROMPTS, os.path.join(args.work, f"preview_{step:06d}.png"))
            save(args.out + ".partial", vae, ema_te, tok, ema_unet)
    unet_minutes = (time.time() - t0) / 60
    log(f"stage 2 stopped at step {step} after {unet_minutes:.1f} min", logf)
    sample_grid(ema_unet, ema_te, vae, tok, scale, PREVIEW_PROMPTS, os.path.join(args.work, "preview_final.png"))
    save(args.out, vae, ema_te, tok, ema_unet)
    recipe = {
        "seed": args.seed,
        "vae_steps": args.vae_steps if not (args.vae or args.init) else None,
        "init": args.init,
        "vae_minutes": round(vae_minutes, 1),
        "unet_steps": step,
        "unet_minutes": round(unet_minutes, 1),
        "batch": args.batch,
        "lr": args.lr,
        "threads": args.threads,
        "data": info,
        "torch": torch.__version__,
        "scaling_factor": scale,
        "final_loss_ema": run_avg,
        "loc_weight": args.loc_weight,
        "final_loc_ema": loc_avg,
        "box_mask_p": args.box_mask_p,
        "box_jitter": args.box_jitter,
    }
    json.dump(recipe, open(os.path.join(args.out, "recipe.json"), "w"), indent=2)
    log(f"saved {args.out}: {recipe}", logf)


def save(out, vae, te, tok, unet):
    sched = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                          clip_sample=False, set_alpha_to_one=False, steps_offset=1,
                          prediction_type="epsilon", timestep_spacing="leading")
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=te, tokenizer=tok, unet=unet, scheduler=sched,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(out, safe_serialization=True)
    fix_tokenizer(out)


def fix_tokenizer(out):
    """The SD 2.1 tokenizer files as fixtures/tiny-sd21 has them: vocab.json + merges.txt (what
    mifo and CLIPTokenizer read); transformers 5 saves only tokenizer.json, which duplicates them."""
    folder = os.path.join(out, "tokenizer")
    for name in os.listdir(folder):
        os.remove(os.path.join(folder, name))
    for name in ("vocab.json", "merges.txt", "tokenizer_config.json"):
        shutil.copy(os.path.join(TOKENIZER_SRC, name), os.path.join(folder, name))


if __name__ == "__main__":
    main()
