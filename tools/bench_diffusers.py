#!/usr/bin/env python3
"""The rows of `mifo bench`, done with diffusers/transformers/PyTorch, for a ratio table.

    python tools/bench_diffusers.py                      # the bundled tiny model, CPU
    python tools/bench_diffusers.py --shape sd21-base --size 256 --iters 1
    python tools/bench_diffusers.py --shape sd21-base --device cuda --iters 5
    python tools/bench_diffusers.py --compare mifo.json  # ours/diffusers ratio per row

Optional: nothing in mifo's build or tests needs Python. Needs torch, diffusers, transformers
(and scikit-learn for the K-means row, as the official MIFO / Bounded Attention code uses it).

Each learning / synthesis row is one iteration of the same work as mifo's loop, written the way
the official MIFO code (diffusers-based, after Break-a-Scene and Bounded Attention) does it:
- learn_phase_a: textual-inversion style — the whole token-embedding table is a parameter,
  AdamW steps it and the non-placeholder rows are restored afterwards; UNet forward with
  attention processors that record the head-mean cross-attention probabilities of the
  placeholder tokens on the up blocks; masked MSE + attention penalty; backward; AdamW.
- learn_phase_b_lora / _full: the same forward with LoRA adapters (rank 4, on to_q/k/v/out and
  the CLIP q/k/v/out projections) or with all UNet and text-encoder weights trainable.
- synth_step: CFG batch-2 UNet forward where every attention layer adds a box-control bias to
  its logits (explicit attention, as Bounded Attention computes it).
- synth_step_latent_opt: 5 descent iterations (batch-1 forward with maps + box loss + backward
  to the latent), one loss pass, then the batch-2 step.
- kmeans_refine: scikit-learn KMeans (3 clusters per subject) on the self-attention features of
  up_blocks.1, warm-started from the previous centres as mifo does after its first refinement.
Latents of the learning image are encoded once and reused (mifo caches them too).
"""
import argparse
import json
import math
import os
import resource
import statistics
import sys
import time

import torch
import torch.nn.functional as F

ROWS = [
    "text_encode", "vae_encode", "vae_decode", "unet_forward", "learn_phase_a",
    "learn_phase_b_lora", "learn_phase_b_full", "synth_step", "synth_step_latent_opt",
    "kmeans_refine",
]

SD21_UNET = dict(
    block_out_channels=[320, 640, 1280, 1280],
    down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
    up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
    attention_head_dim=[5, 10, 20, 20], cross_attention_dim=1024, layers_per_block=2,
    norm_num_groups=32, use_linear_projection=True, sample_size=64, in_channels=4,
    out_channels=4, flip_sin_to_cos=True, freq_shift=0,
)
SD21_TEXT = dict(vocab_size=49408, hidden_size=1024, intermediate_size=4096,
                 num_hidden_layers=23, num_attention_heads=16, max_position_embeddings=77,
                 hidden_act="gelu", projection_dim=512)
SD21_VAE = dict(block_out_channels=[128, 256, 512, 512], layers_per_block=2, norm_num_groups=32,
                latent_channels=4, down_block_types=["DownEncoderBlock2D"] * 4,
                up_block_types=["UpDecoderBlock2D"] * 4, scaling_factor=0.18215)


def peak_reset(device):
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    else:
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        except OSError:
            pass


def peak_mib(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, iters, device):
    fn()
    sync(device)
    out = []
    for _ in range(iters):
        t = time.perf_counter()
        fn()
        sync(device)
        out.append((time.perf_counter() - t) * 1e3)
    return out


class Recorder:
    """Attention processor state shared by all layers of one UNet."""

    def __init__(self):
        self.mode = "plain"        # plain | learn | box
        self.tokens = []           # key columns recorded in learn/box mode
        self.record_prefix = ()    # module paths whose cross maps are recorded
        self.maps = {}             # path -> [B, q, J] head-mean probabilities
        self.self_maps = {}        # path -> [q, q] head/batch-mean self-attention
        self.bias = {}             # (kind, q_len, k_len) -> logit bias [q, k]
        self.record_self = ()


class Processor:
    """Explicit attention where mifo's hook acts (recording / box bias), SDPA elsewhere."""

    def __init__(self, rec, path):
        self.rec, self.path = rec, path

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None,
                 temb=None, **kwargs):
        rec = self.rec
        cross = encoder_hidden_states is not None
        ctx = encoder_hidden_states if cross else hidden_states
        b, n, _ = hidden_states.shape
        q = attn.to_q(hidden_states)
        k = attn.to_k(ctx)
        v = attn.to_v(ctx)
        h = attn.heads
        d = q.shape[-1] // h
        q, k, v = (x.view(b, -1, h, d).transpose(1, 2) for x in (q, k, v))
        wants_cross = cross and rec.mode != "plain" and self.path.startswith(rec.record_prefix)
        wants_bias = rec.mode == "box"
        wants_self = (not cross) and rec.mode == "box" and self.path.startswith(rec.record_self)
        if wants_cross or wants_bias or wants_self:
            logits = (q * d ** -0.5) @ k.transpose(-1, -2)
            if wants_bias:
                key = ("c" if cross else "s", n, k.shape[2])
                bias = rec.bias.get(key)
                if bias is None:
                    bias = torch.zeros(n, k.shape[2], device=q.device, dtype=q.dtype)
                    side = int(math.isqrt(n))
                    half = side // 2
                    bias.view(side, side, -1)[:, half:, : k.shape[2] // 2] = -1e4
                    rec.bias[key] = bias
                logits = logits + bias
            probs = logits.softmax(-1)
            if wants_cross and rec.tokens:
                rec.maps[self.path] = probs.mean(1)[..., rec.tokens]
            if wants_self:
                rec.self_maps[self.path] = probs.mean((0, 1))
            out = probs @ v
        else:
            out = F.scaled_dot_product_attention(q, k, v)
        out = out.transpose(1, 2).reshape(b, n, h * d)
        return attn.to_out[1](attn.to_out[0](out))


class LoraLinear(torch.nn.Module):
    def __init__(self, base, rank):
        super().__init__()
        self.base = base
        self.a = torch.nn.Parameter(torch.randn(rank, base.in_features) / base.in_features ** 0.5)
        self.b = torch.nn.Parameter(torch.zeros(base.out_features, rank))

    def forward(self, x):
        return self.base(x) + (x @ self.a.t()) @ self.b.t()


def add_lora(module, rank, names):
    params = []
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, torch.nn.Linear) and name in names:
                lora = LoraLinear(child, rank).to(child.weight.device, child.weight.dtype)
                setattr(parent, name, lora)
                params += [lora.a, lora.b]
        if hasattr(parent, "to_out") and isinstance(parent.to_out, torch.nn.ModuleList):
            child = parent.to_out[0]
            if isinstance(child, torch.nn.Linear):
                lora = LoraLinear(child, rank).to(child.weight.device, child.weight.dtype)
                parent.to_out[0] = lora
                params += [lora.a, lora.b]
    return params


def install(unet, rec):
    procs = {}
    for name in unet.attn_processors:
        procs[name] = Processor(rec, name.rsplit(".processor", 1)[0])
    unet.set_attn_processor(procs)


def load(args, device, dtype):
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    tok = CLIPTokenizer.from_pretrained(args.model, subfolder="tokenizer")
    if args.shape == "sd21-base":
        torch.manual_seed(0)
        cfg = dict(SD21_UNET)
        cfg["sample_size"] = args.size // 8
        unet = UNet2DConditionModel(**cfg)
        te = CLIPTextModel(CLIPTextConfig(**SD21_TEXT))
        vae = AutoencoderKL(**SD21_VAE)
    else:
        unet = UNet2DConditionModel.from_pretrained(args.model, subfolder="unet")
        te = CLIPTextModel.from_pretrained(args.model, subfolder="text_encoder")
        vae = AutoencoderKL.from_pretrained(args.model, subfolder="vae")
    sched = DDIMScheduler.from_pretrained(args.model, subfolder="scheduler")
    for m in (unet, te, vae):
        m.to(device, dtype).requires_grad_(False).eval()
    return tok, te, unet, vae, sched


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    here = os.path.dirname(os.path.abspath(__file__))
    ap.add_argument("--model", default=os.path.join(here, "..", "fixtures", "tiny-sd21"))
    ap.add_argument("--shape", choices=["sd21-base"])
    ap.add_argument("--size", type=int)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="f32", choices=["f32", "f16", "bf16"])
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--only", default="")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--compare", help="a `mifo bench --json` file: print ours/diffusers ratios")
    args = ap.parse_args()
    device = torch.device(args.device)
    dtype = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}[args.dtype]
    only = [r for r in args.only.split(",") if r]
    for r in only:
        if r not in ROWS:
            sys.exit(f"--only: unknown row {r!r} (rows: {', '.join(ROWS)})")
    wanted = lambda r: not only or r in only
    if args.shape and args.size is None:
        args.size = 512 if device.type == "cuda" else 256
    torch.manual_seed(0)
    tok, te, unet, vae, sched = load(args, device, dtype)
    size = args.size or unet.config.sample_size * 8
    lat = size // 8
    n = args.iters
    rows = []

    def push(name, label, ms, note=""):
        ms = sorted(ms)
        row = dict(name=name, label=label, median_ms=statistics.median(ms) if ms else float("nan"),
                   min_ms=ms[0] if ms else float("nan"), runs=len(ms), peak_mib=peak_mib(device),
                   note=note)
        rows.append(row)
        if not args.json:
            print(f"  {line(row)}", file=sys.stderr, flush=True)

    rec = Recorder()
    install(unet, rec)
    ids = tok("a photo of a cat and a dog", padding="max_length", max_length=77,
              return_tensors="pt").input_ids.to(device)
    with torch.no_grad():
        if wanted("text_encode"):
            peak_reset(device)
            push("text_encode", "text encoding (1x77, frozen)",
                 timed(lambda: te(ids)[0], n, device))
        image = (torch.randn(1, 3, size, size) * 0.5).to(device, dtype)
        latent = torch.randn(1, 4, lat, lat).to(device, dtype)
        if wanted("vae_encode"):
            peak_reset(device)
            push("vae_encode", "VAE encode", timed(lambda: vae.encode(image).latent_dist.mean,
                                                     n, device))
        if wanted("vae_decode"):
            peak_reset(device)
            push("vae_decode", "VAE decode", timed(lambda: vae.decode(latent).sample, n, device))
        ctx = te(ids)[0]
        ctx2 = torch.cat([ctx, ctx])
        x2 = torch.cat([latent, latent])
        t500 = torch.tensor([500], device=device)
        if wanted("unet_forward"):
            rec.mode = "plain"
            peak_reset(device)
            push("unet_forward", "UNet forward, CFG batch 2 (SDPA)",
                 timed(lambda: unet(x2, t500, ctx2).sample, n, device))
        z0 = vae.encode(image).latent_dist.mean * vae.config.scaling_factor

    # ---- learning ----
    tok.add_tokens(["<v0>", "<v1>"])
    new_ids = tok.convert_tokens_to_ids(["<v0>", "<v1>"])
    te.resize_token_embeddings(len(tok))
    emb = te.get_input_embeddings().weight
    prompt_ids = tok("a photo of <v0> and <v1>", padding="max_length", max_length=77,
                     return_tensors="pt").input_ids.to(device)
    positions = [prompt_ids[0].tolist().index(i) for i in new_ids]
    yy, xx = torch.meshgrid(torch.linspace(0, 1, lat), torch.linspace(0, 1, lat), indexing="ij")
    masks = torch.stack([((xx - 0.3) ** 2 + (yy - 0.5) ** 2 <= 0.04),
                         ((xx - 0.72) ** 2 + (yy - 0.45) ** 2 <= 0.0256)]).to(device, dtype)

    def learn_step(params, opt, restore_rows):
        noise = torch.randn_like(z0)
        t = torch.randint(0, 1000, (1,), device=device)
        zt = sched.add_noise(z0, noise, t)
        rec.mode, rec.tokens, rec.maps = "learn", positions, {}
        rec.record_prefix = ("up_blocks.1", "up_blocks.2")
        ehs = te(prompt_ids)[0]
        eps = unet(zt, t, ehs).sample
        m = masks.amax(0)[None, None]
        loss = F.mse_loss(eps * m, noise * m)
        for amap in rec.maps.values():
            side = int(math.isqrt(amap.shape[1]))
            mk = F.interpolate(masks[None], size=(side, side), mode="bilinear")[0]
            a = amap[0].transpose(0, 1).reshape(-1, side, side)
            loss = loss + 0.01 * ((1 - mk) * a).pow(2).mean() * a.shape[0]
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if restore_rows is not None:
            with torch.no_grad():   # textual inversion: keep every other row as it was
                keep = torch.ones(emb.shape[0], dtype=torch.bool, device=device)
                keep[new_ids] = False
                emb[keep] = restore_rows[keep]
        return float(loss)

    if wanted("learn_phase_a"):
        emb.requires_grad_(True)
        orig = emb.detach().clone()
        opt = torch.optim.AdamW([emb], lr=5e-3)
        peak_reset(device)
        push("learn_phase_a", "learning phase-A iteration (embeddings)",
             timed(lambda: learn_step([emb], opt, orig), n, device),
             "TI-style: whole table trained, other rows restored")
        emb.requires_grad_(False)
    if wanted("learn_phase_b_lora"):
        emb.requires_grad_(True)
        params = add_lora(unet, 4, {"to_q", "to_k", "to_v"}) + \
            add_lora(te, 4, {"q_proj", "k_proj", "v_proj", "out_proj"})
        install(unet, rec)
        orig = emb.detach().clone()
        opt = torch.optim.AdamW(params + [emb], lr=2e-6)
        peak_reset(device)
        push("learn_phase_b_lora", "learning phase-B iteration, LoRA",
             timed(lambda: learn_step(params, opt, orig), n, device), "rank 4")
        emb.requires_grad_(False)
        # Back to the plain model for the next rows.
        tok2, te, unet, vae, sched = load(args, device, dtype)
        te.resize_token_embeddings(len(tok))
        emb = te.get_input_embeddings().weight
        install(unet, rec)
    if wanted("learn_phase_b_full"):
        for m in (unet, te):
            m.requires_grad_(True)
        params = [p for m in (unet, te) for p in m.parameters()]
        orig = emb.detach().clone()
        opt = torch.optim.AdamW(params, lr=2e-6)
        peak_reset(device)
        push("learn_phase_b_full", "learning phase-B iteration, full fine-tuning",
             timed(lambda: learn_step(params, opt, orig), n, device))
        for m in (unet, te):
            m.requires_grad_(False)
        del opt, params

    # ---- synthesis ----
    ids_plain = tok("a photo of a cat and a dog", padding="max_length", max_length=77,
                    return_tensors="pt").input_ids.to(device)
    subj = [ids_plain[0].tolist().index(tok.convert_tokens_to_ids(w + "</w>"))
            for w in ("cat", "dog")]
    with torch.no_grad():
        cond = te(ids_plain)[0]
        uncond = te(tok("", padding="max_length", max_length=77,
                        return_tensors="pt").input_ids.to(device))[0]
    context = torch.cat([uncond, cond])
    sched.set_timesteps(50)
    z = torch.randn(1, 4, lat, lat, device=device, dtype=dtype)
    t = sched.timesteps[0:1].to(device)

    def box_loss():
        total = 0
        for amap in rec.maps.values():
            side = int(math.isqrt(amap.shape[1]))
            a = amap[0].transpose(0, 1).reshape(-1, side, side)
            inside = torch.zeros_like(a)
            inside[0, :, : side // 2] = 1
            inside[1, :, side // 2:] = 1
            total = total + (1 - (a * inside).sum((1, 2)) / a.sum((1, 2))).pow(2).sum()
        return total

    def normal_step():
        nonlocal z
        rec.mode, rec.tokens, rec.maps = "box", subj, {}
        rec.record_prefix, rec.record_self = ("mid_block", "up_blocks.1"), ("up_blocks.1",)
        with torch.no_grad():
            eps = unet(torch.cat([z, z]), t, context).sample
            eu, ec = eps.chunk(2)
            z = sched.step(eu + 7.5 * (ec - eu), t[0], z).prev_sample

    def guided_step():
        nonlocal z
        rec.mode, rec.tokens = "box", subj
        rec.record_prefix, rec.record_self = ("mid_block", "up_blocks.1"), ()
        for _ in range(5):
            zz = z.detach().requires_grad_(True)
            rec.maps = {}
            unet(zz, t, cond).sample
            loss = box_loss()
            (g,) = torch.autograd.grad(loss, zz)
            z = (zz - 8.0 * g).detach()
        with torch.no_grad():
            rec.maps = {}
            unet(z, t, cond)
            float(box_loss())
        normal_step()

    if wanted("synth_step"):
        peak_reset(device)
        push("synth_step", "synthesis step (CFG batch 2, box bias in every layer)",
             timed(normal_step, n, device))
    if wanted("synth_step_latent_opt"):
        peak_reset(device)
        push("synth_step_latent_opt", "synthesis step with latent optimisation",
             timed(guided_step, n, device), "5 descent iterations + 1 loss pass per step")
    if wanted("kmeans_refine"):
        try:
            from sklearn.cluster import KMeans
        except ImportError:
            print("kmeans_refine: scikit-learn is not installed; row skipped", file=sys.stderr)
        else:
            normal_step()
            sm = next(iter(rec.self_maps.values())).float().cpu()
            feats = (sm / (sm.amax(0, keepdim=True) + 1e-8)).numpy()
            first = KMeans(n_clusters=6, n_init=100, max_iter=100, random_state=0).fit(feats)
            peak_reset(device)
            ms = timed(lambda: KMeans(n_clusters=6, init=first.cluster_centers_, n_init=1,
                                      max_iter=100).fit(feats), n, device)
            push("kmeans_refine", "K-means mask refinement (scikit-learn)", ms,
                 f"{feats.shape[0]} points, 6 clusters, from the previous centres")

    report = dict(model=args.shape or os.path.abspath(args.model), device=str(device),
                  dtype=args.dtype, size=size, threads=torch.get_num_threads(),
                  torch=torch.__version__, rows=rows)
    if args.compare:
        with open(args.compare) as f:
            ours = {r["name"]: r for r in json.load(f)["rows"]}
        print(f"{'row':<22} {'mifo ms':>10} {'diffusers ms':>13} {'ratio':>7}")
        for r in rows:
            o = ours.get(r["name"])
            if o:
                print(f"{r['name']:<22} {o['median_ms']:>10.2f} {r['median_ms']:>13.2f} "
                      f"{o['median_ms'] / r['median_ms']:>7.2f}")
    elif args.json:
        print(json.dumps(report, indent=2))
    else:
        print(f"model: {report['model']}\ndevice: {device} ({report['threads']} threads), "
              f"dtype {args.dtype}, image {size}^2, torch {torch.__version__}")
        print(f"{'row':<22} {'median ms':>11} {'min ms':>11} {'runs':>5} {'peak MiB':>10}  what")
        for r in rows:
            print(line(r))


def line(r):
    what = f"{r['label']} [{r['note']}]" if r["note"] else r["label"]
    return (f"{r['name']:<22} {r['median_ms']:>11.2f} {r['min_ms']:>11.2f} {r['runs']:>5} "
            f"{r['peak_mib']:>10.0f}  {what}")


if __name__ == "__main__":
    main()
