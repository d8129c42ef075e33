#!/usr/bin/env python3
"""Write a parity reference (`reference.safetensors` + `reference.json`) for a diffusers
StableDiffusionPipeline folder, in the layout of fixtures/tiny-sd21/reference.*, so that

    mifo model verify MODEL_DIR OUT/reference.safetensors

compares mifo number for number against diffusers / transformers (float32, CPU).

Usage (from the repository root):

    nice -n 5 python3 tools/world/make_reference.py --model fixtures/world-sd
    nice -n 5 python3 tools/world/make_reference.py --model fixtures/tiny-sd21 --out /tmp/tiny-ref

`--out` defaults to the model folder itself. Every size comes from the model's configs: image
H x W = unet.sample_size x 2^(number of VAE levels - 1), the latent from the UNet, the attention
layers (and their feature-map sizes, found by a forward pass) from the UNet's modules.

What it writes (the names and meanings of fixtures/README.md section B; `L` = [4, H/8, W/8]):

* `tokens.*`: ids of four prompts with the placeholders `<asset0>`, `<asset1>` added to the
  tokenizer and with the saved base tokenizer, the empty negative prompt, the new ids and the ids
  of the init words (`circle`, `square` by default) whose embedding rows the placeholders copy;
  `text.*`: the copied rows and the text encoder's last hidden states.
* `unet.*`: one UNet forward (batch 2) and `attn_probs.*`, the softmax probabilities of every
  up-block cross-attention layer plus one self-attention layer in that forward, taken from an
  explicit-softmax attention processor (same maths as diffusers' AttnProcessor).
* `vae.*`: encoder mean / logvar of a world scene image and the decoding of that mean.
* `ddim.*`: alphas_cumprod, the 50-step timesteps, two `DDIMScheduler.step` calls.
* `masks.image`, `train.*`, `grad_a.*` (masked diffusion loss and its gradients to the
  placeholder rows and to the text states), `grad_b.*` (penalty on `<asset0>`'s head-mean
  cross-attention outside its mask over the up-block cross-attention layers, its maps, masks and
  gradients), `grad_c2.latent` (the penalty's gradient to the latent), `grad_c.*` (gradient of a
  fixed linear function of `unet.eps` to `unet.latent`).
* `mifo.*`: MIFO's reconstruction loss, attention reward and penalty as its released code
  computes them (bilinear masks, attn2 layers of up_blocks.1 and up_blocks.2, both tokens,
  weights 0.01 / 0.02) and their gradients to the placeholder rows.
* `e2e.*`: a 5-step StableDiffusionPipeline run (DDIM, CFG 7.5, empty negative prompt) from
  stored initial latents, with the latents after every step and the output image.

The VAE image and the two masks come from the world: `mifo world scene --seed 0 --objects 2
--differ colour --size H DIR` (img.png; mask0.png = `<asset0>`, mask1.png = `<asset1>`), drawn
at the model's image size (resized with PIL bicubic / nearest only if the image is not square).
Pass `--scene DIR` to use a scene folder drawn beforehand instead. Prompt 1 and the end-to-end
prompt are the scene's caption. All other inputs (latents, noise, weights) are N(0, 1) from one
seeded torch.Generator and are stored, so no RNG parity is needed.

Runs single-threaded (torch.set_num_threads(1)); needs torch, diffusers, transformers, Pillow,
safetensors.
"""

import argparse
import contextlib
import copy
import json
import os
import platform
import subprocess
import sys
import tempfile

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import save_file

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
DEFAULT_MIFO = os.path.join(REPO, "target", "release", "mifo")

PLACEHOLDERS = ["<asset0>", "<asset1>"]
# Prompt 1 (the scene caption) is filled in at run time.
PROMPT_0 = "a photo of <asset0> and <asset1>"
PROMPT_2 = "<asset1> sitting next to <asset0>, an oil painting in the style of Van Gogh's \"Starry Night\"!"
PROMPT_3 = "a highly detailed photograph of <asset0>" + (  # > 77 tokens: truncated
    " on a sunny beach with palm trees, golden hour light, 35mm film grain," * 8
)
E2E_STEPS = 5
GUIDANCE = 7.5
MIFO_ALPHA = 0.5
MIFO_REWARD_WEIGHT = 0.01
MIFO_PENALTY_WEIGHT = 0.02


# ---------------------------------------------------------------------------------------------
# Attention capture
# ---------------------------------------------------------------------------------------------


class CaptureProcessor:
    """Attention with an explicit softmax (the maths of diffusers' AttnProcessor) that keeps the
    probabilities, [batch, heads, q, k], on the autograd graph in `store[name]`."""

    def __init__(self, name, store):
        self.name = name
        self.store = store

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                 *args, **kwargs):
        unsupported = (
            attention_mask is not None
            or attn.spatial_norm is not None
            or attn.group_norm is not None
            or attn.residual_connection
            or getattr(attn, "norm_q", None) is not None
            or hidden_states.ndim != 3
        )
        if unsupported:
            raise RuntimeError(f"{self.name}: attention variant not handled by CaptureProcessor")
        ctx = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        if encoder_hidden_states is not None and attn.norm_cross:
            ctx = attn.norm_encoder_hidden_states(ctx)
        b, n, _ = hidden_states.shape
        heads = attn.heads

        def split_heads(x):  # [b, len, heads*d] -> [b, heads, len, d]
            return x.view(b, x.shape[1], heads, x.shape[2] // heads).transpose(1, 2)

        q = split_heads(attn.to_q(hidden_states))
        k = split_heads(attn.to_k(ctx))
        v = split_heads(attn.to_v(ctx))
        probs = torch.softmax(torch.matmul(q, k.transpose(-1, -2)) * attn.scale, dim=-1)
        self.store[self.name] = probs
        out = torch.matmul(probs, v).transpose(1, 2).reshape(b, n, -1)
        out = attn.to_out[1](attn.to_out[0](out))
        return out / attn.rescale_output_factor


@contextlib.contextmanager
def capture(unet, layers, store):
    """Temporarily gives the named attention layers a CaptureProcessor."""
    modules = dict(unet.named_modules())
    saved = {name: modules[name].processor for name in layers}
    try:
        for name in layers:
            modules[name].set_processor(CaptureProcessor(name, store))
        yield store
    finally:
        for name, proc in saved.items():
            modules[name].set_processor(proc)


def attention_layers(unet):
    """Names of the UNet's attention modules in module order."""
    from diffusers.models.attention_processor import Attention

    return [name for name, m in unet.named_modules() if isinstance(m, Attention)]


def feature_map_sizes(unet, layers, latent, t, ehs):
    """(h, w) of the feature map each attention layer sees, from its Transformer2DModel's input."""
    modules = dict(unet.named_modules())
    sizes, hooks = {}, []
    for name in layers:
        parent = name.split(".transformer_blocks.")[0]

        def hook(_mod, args, kwargs, name=name):
            x = args[0] if args else kwargs["hidden_states"]
            sizes[name] = (int(x.shape[-2]), int(x.shape[-1]))

        hooks.append(modules[parent].register_forward_pre_hook(hook, with_kwargs=True))
    with torch.no_grad():
        unet(latent, t, encoder_hidden_states=ehs)
    for h in hooks:
        h.remove()
    return sizes


def in_blocks(name, blocks):
    """Whether module path `name` lies in one of `blocks` (whole dotted components)."""
    return any(name == b or name.startswith(b + ".") for b in blocks)


def head_mean_maps(probs, column, h, w):
    """Head-mean probability on key `column`, reshaped row-major to [B, h, w]."""
    return probs.mean(dim=1)[:, :, column].reshape(probs.shape[0], h, w)


# ---------------------------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------------------------


def load_scene(args, height, width, workdir):
    """The world scene: (image u8 [H, W, 3], masks [2, H, W] float 0/1, scene.json, command)."""
    if args.scene:
        folder, cmd = args.scene, None
    else:
        folder = os.path.join(workdir, "scene")
        cmd = [args.mifo, "world", "scene", "--seed", str(args.scene_seed), "--objects", "2",
               "--differ", "colour", "--size", str(max(height, width)), folder]
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    info = json.load(open(os.path.join(folder, "scene.json")))
    img = Image.open(os.path.join(folder, "img.png")).convert("RGB")
    if img.size != (width, height):
        img = img.resize((width, height), Image.BICUBIC)
    masks = []
    for i in range(2):
        m = Image.open(os.path.join(folder, f"mask{i}.png")).convert("L")
        if m.size != (width, height):
            m = m.resize((width, height), Image.NEAREST)
        masks.append(torch.from_numpy((np.asarray(m) > 127).astype(np.float32)))
    shown_cmd = None if cmd is None else " ".join(["mifo"] + cmd[1:-1] + ["DIR"])
    return np.asarray(img), torch.stack(masks), info, shown_cmd


def encode_ids(tokenizer, texts):
    """As StableDiffusionPipeline tokenizes: pad to max length with the pad token, truncate."""
    return tokenizer(texts, padding="max_length", max_length=tokenizer.model_max_length,
                     truncation=True, return_tensors="pt").input_ids.long()


def versions():
    import diffusers
    import safetensors
    import tokenizers
    import transformers
    import PIL

    return {"python": platform.python_version(), "torch": torch.__version__, "numpy": np.__version__,
            "diffusers": diffusers.__version__, "transformers": transformers.__version__,
            "tokenizers": tokenizers.__version__, "safetensors": safetensors.__version__,
            "pillow": PIL.__version__}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="diffusers StableDiffusionPipeline folder")
    ap.add_argument("--out", help="folder for reference.safetensors / reference.json (default: --model)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the random inputs")
    ap.add_argument("--scene", help="use this `mifo world scene` folder instead of drawing one")
    ap.add_argument("--scene-seed", type=int, default=0, help="--seed of `mifo world scene`")
    ap.add_argument("--mifo", default=DEFAULT_MIFO, help="the mifo binary that draws the scene")
    ap.add_argument("--init-words", nargs=2, default=["circle", "square"], metavar=("W0", "W1"),
                    help="words whose embedding rows <asset0>, <asset1> start from")
    ap.add_argument("--mifo-blocks", default="up_blocks.1,up_blocks.2",
                    help="blocks whose attn2 layers the mifo.* terms use (mifo's default)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    torch.set_grad_enabled(True)
    out_dir = args.out or args.model
    os.makedirs(out_dir, exist_ok=True)

    from diffusers import DDIMScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(args.model, dtype=torch.float32,
                                                   safety_checker=None, feature_extractor=None,
                                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    unet, vae, te, tok = pipe.unet.eval(), pipe.vae.eval(), pipe.text_encoder.eval(), pipe.tokenizer
    for p in list(unet.parameters()) + list(vae.parameters()) + list(te.parameters()):
        p.requires_grad_(False)
    sched_cfg = dict(pipe.scheduler.config)
    T = int(sched_cfg["num_train_timesteps"])

    # ---- sizes, all from the configs ----------------------------------------------------------
    s = unet.config.sample_size
    lh, lw = (s, s) if isinstance(s, int) else tuple(s)
    vae_factor = 2 ** (len(vae.config.block_out_channels) - 1)
    H, W = lh * vae_factor, lw * vae_factor
    C = unet.config.in_channels
    hidden = te.config.hidden_size
    sf = float(vae.config.scaling_factor)
    L = [C, lh, lw]
    Ls = "x".join(map(str, L))
    gen = torch.Generator().manual_seed(args.seed)

    def randn(*shape):
        return torch.randn(*shape, generator=gen)

    T_ = {}  # name -> tensor (insertion order = file order)
    D = {}   # name -> description

    def put(name, tensor, desc):
        tensor = tensor.detach().contiguous()
        if tensor.dtype.is_floating_point:
            tensor = tensor.float()
        elif tensor.dtype != torch.int64:
            tensor = tensor.long()
        if tensor.dim() == 0:
            tensor = tensor.reshape(1)
        T_[name] = tensor.clone()
        D[name] = desc

    with tempfile.TemporaryDirectory() as work:
        scene_u8, masks, scene_info, scene_cmd = load_scene(args, H, W, work)
    caption = scene_info["caption"]
    prompts = [PROMPT_0, caption, PROMPT_2, PROMPT_3]

    # ---- tokenizer and placeholders ------------------------------------------------------------
    tok_ext = copy.deepcopy(tok)
    if tok_ext.add_tokens(PLACEHOLDERS) != len(PLACEHOLDERS):
        raise SystemExit("placeholder tokens already exist in the tokenizer")
    new_ids = tok_ext.convert_tokens_to_ids(PLACEHOLDERS)
    init_ids = []
    for w in args.init_words:
        pieces = tok.encode(w, add_special_tokens=False)
        if len(pieces) != 1:
            print(f"warning: init word {w!r} is {len(pieces)} tokens; using the first", file=sys.stderr)
        init_ids.append(pieces[0])
    base_vocab = te.get_input_embeddings().weight.shape[0]
    te_ext = copy.deepcopy(te)
    te_ext.resize_token_embeddings(len(tok_ext), mean_resizing=False)  # rows are overwritten
    emb = te_ext.get_input_embeddings().weight
    with torch.no_grad():
        emb[new_ids] = te.get_input_embeddings().weight[init_ids].clone()
    emb.requires_grad_(True)

    prompt_ids = encode_ids(tok_ext, prompts)
    prompt_ids_base = encode_ids(tok, prompts)
    uncond_ids = encode_ids(tok_ext, [""])
    key_pos = [int((prompt_ids[0] == i).nonzero()[0, 0]) for i in new_ids]
    max_len = prompt_ids.shape[1]
    pad = tok.pad_token

    put("tokens.prompt_input_ids", prompt_ids,
        f"input_ids (int64, [n_prompts, {max_len}]) of meta.prompts with {PLACEHOLDERS[0]}={new_ids[0]} and "
        f"{PLACEHOLDERS[1]}={new_ids[1]} ADDED to the tokenizer; SOT + tokens + EOT, truncated to {max_len} and padded "
        f"with the pad token {pad!r} (id {tok.pad_token_id}) like StableDiffusionPipeline (padding='max_length', "
        "truncation=True). Prompt 3 is truncated.")
    put("tokens.prompt_input_ids_base_tokenizer", prompt_ids_base,
        f"same prompts tokenized with the saved (base, {len(tok)}-token) tokenizer, i.e. BEFORE the placeholder tokens "
        "are added: the placeholders are split into ordinary BPE pieces.")
    put("tokens.uncond_input_ids", uncond_ids,
        f"input_ids [1, {max_len}] of the empty negative prompt '' (SOT, EOT, then pad).")
    put("tokens.new_token_ids", torch.tensor(new_ids), f"ids of the added tokens {', '.join(PLACEHOLDERS)}.")
    put("tokens.init_token_ids", torch.tensor(init_ids),
        f"ids of the init words {args.init_words} (first BPE token of each: {init_ids}) whose rows are copied.")
    put("text.new_token_embeddings", emb[new_ids],
        f"rows {new_ids[0]}, {new_ids[1]} of the RESIZED token embedding (text_model.embeddings.token_embedding), "
        f"[2, hidden]; equal to rows init_token_ids {init_ids} of the saved embedding.")

    # ---- text encoder ----------------------------------------------------------------------------
    with torch.no_grad():
        text_h = te_ext(prompt_ids)[0]
        uncond_h = te_ext(uncond_ids)[0]
    put("text.last_hidden_state", text_h,
        f"CLIPTextModel(last_hidden_state) for tokens.prompt_input_ids, [n_prompts, {max_len}, hidden]: after "
        "final_layer_norm, causal mask, NO attention mask (as SD pipelines call it).")
    put("text.uncond_last_hidden_state", uncond_h,
        f"last_hidden_state [1, {max_len}, hidden] for tokens.uncond_input_ids.")

    # ---- attention layers from the model ----------------------------------------------------------
    all_attn = attention_layers(unet)
    up_attn2 = [n for n in all_attn if n.startswith("up_blocks.") and n.endswith(".attn2")]
    if not up_attn2:
        raise SystemExit("the UNet has no up-block cross-attention layers")
    cross_up_blocks = sorted({n.split(".attentions.")[0] for n in up_attn2}, key=lambda b: int(b.split(".")[1]))
    self_block = cross_up_blocks[len(cross_up_blocks) // 2]
    self_attn = next(n for n in all_attn if n.startswith(self_block + ".") and n.endswith(".attn1"))
    prob_layers = up_attn2 + [self_attn]
    mifo_blocks = [b for b in args.mifo_blocks.split(",") if b]
    mifo_layers = [n for n in up_attn2 if in_blocks(n, mifo_blocks)]

    # ---- UNet forward, attention probabilities, grad (c) ---------------------------------------------
    u_latent = randn(2, *L)
    u_t = torch.tensor([T - 1, int(0.35 * T) + 1])
    u_ehs = text_h[0:2]
    sizes = feature_map_sizes(unet, all_attn, u_latent, u_t, u_ehs)
    lat_var = u_latent.clone().requires_grad_(True)
    eps = unet(lat_var, u_t, encoder_hidden_states=u_ehs).sample
    gc_w = randn(2, *L)
    gc_s = (gc_w * eps).sum()
    (gc_grad,) = torch.autograd.grad(gc_s, lat_var)
    store = {}
    with torch.no_grad(), capture(unet, prob_layers, store):
        eps_capture = unet(u_latent, u_t, encoder_hidden_states=u_ehs).sample
    capture_diff = float((eps_capture - eps.detach()).abs().max())

    put("unet.latent", u_latent, f"UNet input latent x_t, [2, {Ls}] (N(0,1)).")
    put("unet.timesteps", u_t, "UNet timesteps, one per batch element (int64).")
    put("unet.encoder_hidden_states", u_ehs,
        f"encoder states = text.last_hidden_state[0:2] (prompts 0 and 1), [2, {max_len}, hidden].")
    put("unet.eps", eps, f"UNet2DConditionModel(...).sample (stock attention processors), predicted noise, [2, {Ls}].")
    for name in prob_layers:
        h, w = sizes[name]
        kind = "cross-attention" if name.endswith("attn2") else "self-attention"
        put(f"attn_probs.{name}", store[name],
            f"softmax attention probabilities of {name} ({kind}) in the unet.eps forward, layout [batch, heads, "
            f"query_len, key_len]; query index q = y*w + x over the {h}x{w} feature map (row-major). diffusers' "
            "internal layout is [batch*heads, q, k] with row b*heads+h (same memory).")

    # ---- VAE -------------------------------------------------------------------------------------
    x_img = torch.from_numpy(scene_u8.astype(np.float32)).permute(2, 0, 1)[None] / 127.5 - 1.0
    with torch.no_grad():
        post = vae.encode(x_img).latent_dist
        dec = vae.decode(post.mean).sample
    put("vae.encoder_input", x_img,
        f"world scene image (`mifo world scene`, see meta.scene: {caption!r}) at {H}x{W}, u8 RGB / 127.5 - 1, "
        f"[1, 3, H, W].")
    put("vae.encoder_mean", post.mean,
        f"vae.encode(x).latent_dist.mean, [1, {Ls}] (unscaled; multiply by scaling_factor {sf:g} to get SD latents).")
    put("vae.encoder_logvar", post.logvar, f"latent_dist.logvar (clamped to [-30, 20] by diffusers), [1, {Ls}].")
    put("vae.decoder_input", post.mean,
        f"latent fed to vae.decode (= vae.encoder_mean, i.e. already divided by scaling_factor; directly into "
        f"post_quant_conv), [1, {Ls}].")
    put("vae.decoder_output", dec, "vae.decode(z).sample, raw (not clamped), [1, 3, H, W].")

    # ---- DDIM ------------------------------------------------------------------------------------
    ddim = DDIMScheduler.from_config(sched_cfg)
    ddim.set_timesteps(50)
    ts50 = ddim.timesteps.clone().long()
    step_t = [int(ts50[len(ts50) // 2 - 1]), int(ts50[-1])]
    step_eps, step_x = randn(2, *L), randn(2, *L)
    prev, x0s = [], []
    for i, t in enumerate(step_t):
        r = ddim.step(step_eps[i:i + 1], t, step_x[i:i + 1], eta=0.0)
        prev.append(r.prev_sample)
        x0s.append(r.pred_original_sample)
    put("ddim.alphas_cumprod", ddim.alphas_cumprod,
        f"alphas_cumprod of the {sched_cfg['beta_schedule']} schedule, [{T}].")
    put("ddim.timesteps_50", ts50,
        f"DDIM timesteps for 50 inference steps ({sched_cfg['timestep_spacing']!r} spacing, steps_offset="
        f"{sched_cfg['steps_offset']}): {int(ts50[0])}, {int(ts50[1])}, ..., {int(ts50[-1])}.")
    put("ddim.step_timesteps", torch.tensor(step_t),
        f"t of the two DDIM steps (50-step schedule, so prev t = t - {T // 50}; for t={step_t[1]} prev is "
        f"{step_t[1] - T // 50} and alpha_prev = {'1' if sched_cfg['set_alpha_to_one'] else 'alphas_cumprod[0]'} "
        f"because set_alpha_to_one={sched_cfg['set_alpha_to_one']}).")
    put("ddim.step_eps", step_eps, f"model output (epsilon) for the two steps, [2, {Ls}] (row i = step i).")
    put("ddim.step_sample", step_x, f"current sample x_t for the two steps, [2, {Ls}].")
    put("ddim.step_prev_sample", torch.cat(prev), f"DDIMScheduler.step(eta=0).prev_sample, [2, {Ls}].")
    put("ddim.step_pred_original_sample", torch.cat(x0s), "step(...).pred_original_sample (x0 estimate).")

    # ---- training inputs ---------------------------------------------------------------------------
    put("masks.image", masks,
        f"binary masks at image resolution [2, H, W] (float 0/1) of the world scene (meta.scene): [0] = mask0.png = "
        f"{PLACEHOLDERS[0]}, [1] = mask1.png = {PLACEHOLDERS[1]}.")
    train_ids = prompt_ids[0:1].repeat(2, 1)
    x0 = (post.mean * sf).repeat(2, 1, 1, 1)
    noise = randn(2, *L)
    train_t = torch.tensor([int(0.64 * T), int(0.085 * T)])
    noisy = ddim.add_noise(x0, noise, train_t)
    loss_mask_img = torch.stack([masks.max(dim=0).values, masks[0]])
    loss_mask_lat = F.interpolate(loss_mask_img[:, None], size=(lh, lw), mode="nearest")[:, 0]
    if (loss_mask_lat.sum(dim=(1, 2)) == 0).any():
        raise SystemExit("a scene mask vanishes at latent resolution; try another --scene-seed")
    put("train.input_ids", train_ids, f"prompt 0 ids for both batch elements, [2, {max_len}].")
    put("train.x0", x0, f"clean latent x0 [2, {Ls}]: the scene's vae.encoder_mean * scaling_factor, twice.")
    put("train.noise", noise, f"target noise eps [2, {Ls}].")
    put("train.timesteps", train_t, "training timesteps (int64) per batch element.")
    put("train.noisy_latents", noisy,
        "DDIMScheduler.add_noise(x0, noise, t) = sqrt(acp[t]) x0 + sqrt(1-acp[t]) noise, UNet input.")
    put("train.loss_mask_image", loss_mask_img,
        "per-sample mask at image res [2, H, W]: sample 0 = union of both masks, sample 1 = asset0 mask.")
    put("train.loss_mask_latent", loss_mask_lat,
        f"train.loss_mask_image downsampled with F.interpolate(mode='nearest') to [2, {lh}, {lw}] (src index = "
        f"floor(dst * in/out), i.e. pixel ({H // lh}y, {W // lw}x)).")

    def zero_emb_grad():
        emb.grad = None

    # ---- (a) masked diffusion loss ---------------------------------------------------------------
    zero_emb_grad()
    ehs = te_ext(train_ids)[0]
    ehs.retain_grad()
    eps_a = unet(noisy, train_t, encoder_hidden_states=ehs).sample
    m = loss_mask_lat[:, None]
    loss_a = (m * (eps_a - noise) ** 2).sum() / (C * m.sum())
    loss_a.backward()
    put("grad_a.eps_pred", eps_a, f"UNet eps for train.noisy_latents / train.timesteps / prompt 0, [2, {Ls}].")
    put("grad_a.loss", loss_a,
        f"L = sum_{{b,c,y,x}} M[b,y,x] (eps_pred - noise)^2 / (C * sum_{{b,y,x}} M[b,y,x]), M = "
        f"train.loss_mask_latent, C = {C} (mean over masked latent pixels and channels).")
    put("grad_a.token_embedding_rows", emb.grad[new_ids],
        f"dL/d(token_embedding rows {new_ids[0]}, {new_ids[1]}), [2, hidden]; all other weights frozen.")
    put("grad_a.encoder_hidden_states", ehs.grad, f"dL/d(text last_hidden_state), [2, {max_len}, hidden].")

    # ---- (b) penalty on <asset0> over the up-block cross-attention layers, (c2) ----------------------
    def penalty_b(ehs, latent, record=False):
        store = {}
        with capture(unet, up_attn2, store):
            unet(latent, train_t, encoder_hidden_states=ehs)
        total = 0.0
        for name in up_attn2:
            h, w = sizes[name]
            abar = head_mean_maps(store[name], key_pos[0], h, w)
            mb = F.interpolate(masks[0][None, None], size=(h, w), mode="nearest")[0].expand(abar.shape[0], h, w)
            if record:
                put(f"grad_b.abar.{name}", abar,
                    f"Abar for {name}: head-mean attention on {PLACEHOLDERS[0]}, [2, h, w] = [2, {h}, {w}].")
                put(f"grad_b.mask.{name}", mb,
                    f"M_l for {name} (nearest-downsampled asset0 mask), [2, h, w] = [2, {h}, {w}].")
            total = total + (((1.0 - mb) * abar) ** 2).sum()
        return total

    zero_emb_grad()
    ehs = te_ext(train_ids)[0]
    ehs.retain_grad()
    pen = penalty_b(ehs, noisy, record=True)
    pen.backward()
    put("grad_b.penalty", pen,
        f"MIFO penalty P = sum over the up-block attn2 layers l (meta.up_block_attn2_layers), batch b, pixels (y,x) "
        f"of ((1 - M_l[b,y,x]) * Abar_l[b,y,x])^2 where Abar_l = attention probability column of {PLACEHOLDERS[0]} "
        f"(key index {key_pos[0]}) averaged over heads, reshaped row-major to the layer's h x w, and M_l = asset0 "
        "mask (masks.image[0]) downsampled with F.interpolate(mode='nearest'). Inputs: train.noisy_latents, "
        "train.timesteps, prompt 0.")
    put("grad_b.token_embedding_rows", emb.grad[new_ids],
        f"dP/d(token_embedding rows {new_ids[0]}, {new_ids[1]}), [2, hidden] (row {new_ids[1]} is non-zero through "
        "the softmax normaliser).")
    put("grad_b.encoder_hidden_states", ehs.grad, f"dP/d(text last_hidden_state), [2, {max_len}, hidden].")
    lat = noisy.clone().requires_grad_(True)
    (g_c2,) = torch.autograd.grad(penalty_b(ehs.detach(), lat), lat)
    put("grad_c2.latent", g_c2,
        f"dP/d(UNet input latent train.noisy_latents) for the same penalty P (sampling-time latent optimisation "
        f"through attention maps, Attend-and-Excite style), [2, {Ls}].")
    # File order as in tiny-sd21: the per-layer maps after grad_b.* / grad_c2.
    for name in up_attn2:
        for fam in ("grad_b.abar.", "grad_b.mask."):
            T_[fam + name] = T_.pop(fam + name)
            D[fam + name] = D.pop(fam + name)

    # ---- mifo.*: the losses as MIFO's released code computes them ------------------------------------
    mifo_ids = prompt_ids[0:1]
    m_noisy, m_noise, m_t = noisy[1:2], noise[1:2], train_t[1:2]
    rec_mask = F.interpolate(masks.max(dim=0).values[None, None], size=(lh, lw), mode="nearest")[0]
    put("mifo.input_ids", mifo_ids, f"prompt 0 ids, [1, {max_len}].")
    put("mifo.token_positions", torch.tensor(key_pos), f"key positions of {', '.join(PLACEHOLDERS)} in prompt 0.")
    put("mifo.noisy_latents", m_noisy, f"= train.noisy_latents[1:2], UNet input [1, {Ls}].")
    put("mifo.noise", m_noise, "= train.noise[1:2].")
    put("mifo.timesteps", m_t, f"= train.timesteps[1:2] (< {T // 2}, so MIFO's attention term applies).")
    put("mifo.rec_mask_latent", rec_mask,
        f"union of masks.image[0] and [1], F.interpolate(mode='nearest') to [1, {lh}, {lw}].")

    def mifo_forward(record=False):
        store = {}
        ehs = te_ext(mifo_ids)[0]
        with capture(unet, mifo_layers, store):
            eps = unet(m_noisy, m_t, encoder_hidden_states=ehs).sample
        mm = rec_mask[:, None]
        l_rec = ((mm * eps - mm * m_noise) ** 2).mean()
        reward, penalty = 0.0, 0.0
        for name in mifo_layers:
            h, w = sizes[name]
            abar = torch.cat([head_mean_maps(store[name], p, h, w) for p in key_pos])  # [J, h, w]
            mj = F.interpolate(masks[:, None], size=(h, w), mode="bilinear", align_corners=False)[:, 0]
            if record:
                put(f"mifo.mask.{name}", mj,
                    f"M_j for {name}: masks.image[j] bilinear-downsampled (align_corners=False, no antialias), "
                    f"[2(j), h, w] = [2, {h}, {w}].")
                put(f"mifo.abar.{name}", abar,
                    f"head-mean attention of {name} on {PLACEHOLDERS[0]}/{PLACEHOLDERS[1]}, [2(j), h, w].")
            reward = reward + ((MIFO_ALPHA * mj - abar) ** 2).mean(dim=(1, 2)).sum()
            penalty = penalty + (((1.0 - mj) * abar) ** 2).mean(dim=(1, 2)).sum()
        return eps, l_rec, MIFO_REWARD_WEIGHT * reward, MIFO_PENALTY_WEIGHT * penalty

    def rows_grad(loss):
        (g,) = torch.autograd.grad(loss, emb)
        return g[new_ids]

    m_eps, l_rec, reward, penalty = mifo_forward(record=True)
    rows = f"token_embedding rows {new_ids[0]}, {new_ids[1]}"
    put("mifo.eps_pred", m_eps, f"UNet eps of the MIFO forward, [1, {Ls}].")
    put("mifo.loss_rec", l_rec, "L_rec = mean((m*eps_pred - m*noise)^2) over all 1*C*h*w elements.")
    put("mifo.grad_rec.token_embedding_rows", rows_grad(mifo_forward()[1]), f"dL_rec/d({rows}), [2, hidden].")
    put("mifo.reward", reward, f"{MIFO_REWARD_WEIGHT} * sum_l sum_j mean_p ({MIFO_ALPHA}*M_j - Abar_j)^2")
    put("mifo.grad_reward_term.token_embedding_rows", rows_grad(mifo_forward()[2]),
        f"d(reward term alone)/d({rows}), [2, hidden].")
    _, a, b, _ = mifo_forward()
    put("mifo.grad_reward_phase.token_embedding_rows", rows_grad(a + b),
        f"d(L_rec + reward)/d({rows}), [2, hidden] (= grad_rec + grad_reward_term).")
    put("mifo.penalty", penalty, f"{MIFO_PENALTY_WEIGHT} * sum_l sum_j mean_p ((1 - M_j) * Abar_j)^2")
    put("mifo.grad_penalty_term.token_embedding_rows", rows_grad(mifo_forward()[3]),
        f"d(penalty term alone)/d({rows}), [2, hidden].")
    _, a, _, c = mifo_forward()
    put("mifo.grad_penalty_phase.token_embedding_rows", rows_grad(a + c),
        f"d(L_rec + penalty)/d({rows}), [2, hidden] (= grad_rec + grad_penalty_term).")

    put("grad_c.weights", gc_w, f"fixed weights W, [2, {Ls}].")
    put("grad_c.scalar", gc_s, "S = sum(W * eps) for the unet.eps forward (unet.latent, unet.timesteps, "
        "unet.encoder_hidden_states).")
    put("grad_c.latent", gc_grad, f"dS/d(unet.latent), [2, {Ls}].")

    # ---- end to end: the pipeline itself -----------------------------------------------------------
    e2e_ids = encode_ids(tok, [caption])
    init_lat = randn(1, *L)
    with torch.no_grad():
        cond, uncond = pipe.encode_prompt(caption, torch.device("cpu"), 1, True, negative_prompt="")
    steps = []

    def on_step(_pipe, _i, _t, kw):
        steps.append(kw["latents"].detach().clone())
        return kw

    with torch.no_grad():
        result = pipe(prompt=caption, negative_prompt="", height=H, width=W, num_inference_steps=E2E_STEPS,
                      guidance_scale=GUIDANCE, eta=0.0, latents=init_lat.clone(), output_type="pt",
                      callback_on_step_end=on_step, callback_on_step_end_tensor_inputs=["latents"])
    e2e_ts = pipe.scheduler.timesteps.clone().long()
    put("e2e.input_ids", e2e_ids, f"ids of {caption!r} (base tokenizer).")
    put("e2e.timesteps", e2e_ts, f"DDIM timesteps for {E2E_STEPS} steps: {', '.join(str(int(t)) for t in e2e_ts)}.")
    put("e2e.initial_latents", init_lat, f"initial latent x_T (init_noise_sigma = 1 for DDIM), [1, {Ls}].")
    put("e2e.prompt_embeds", cond, f"cond text embeddings [1, {max_len}, hidden].")
    put("e2e.negative_prompt_embeds", uncond, f"uncond ('' prompt) text embeddings [1, {max_len}, hidden].")
    put("e2e.step_latents", torch.stack(steps),
        f"latents after each of the {E2E_STEPS} DDIM steps, [{E2E_STEPS}, 1, {Ls}]; StableDiffusionPipeline: per step "
        f"eps = unet(cat[x,x], t, cat[uncond, cond]); eps = eps_u + {GUIDANCE} (eps_c - eps_u); x = DDIM step (eta 0).")
    put("e2e.image", result.images,
        f"final pipeline image (output_type='pt'), (vae.decode(x_0 / {sf:g}) / 2 + 0.5).clamp(0, 1), [1, 3, H, W].")

    # ---- meta and files ------------------------------------------------------------------------------
    def cfg(conf, keys):
        return {k: (list(conf[k]) if isinstance(conf[k], (tuple, list)) else conf[k]) for k in keys if k in conf}

    attn_meta = {}
    for name in prob_layers:
        h, w = sizes[name]
        p = T_[f"attn_probs.{name}"]
        attn_meta[name] = {"heads": int(p.shape[1]), "h": h, "w": w, "key_len": int(p.shape[3])}
    meta = {
        "config": os.path.basename(os.path.normpath(args.model)),
        "made_by": "tools/world/make_reference.py --model " + args.model + f" --seed {args.seed}",
        "versions": versions(),
        "seed": args.seed,
        "height": H,
        "width": W,
        "latent_height": lh,
        "latent_width": lw,
        "prompts": prompts,
        "negative_prompt": "",
        "new_tokens": dict(zip(PLACEHOLDERS, new_ids)),
        "init_words": dict(zip(PLACEHOLDERS, args.init_words)),
        "asset0_token_index_in_prompt0": key_pos[0],
        "token_positions_in_prompt0": dict(zip(PLACEHOLDERS, key_pos)),
        "base_vocab_size": base_vocab,
        "pad_token": pad,
        "pad_token_id": tok.pad_token_id,
        "text_encoder": cfg(te.config.to_dict(), ["hidden_size", "num_hidden_layers", "num_attention_heads",
                                                  "intermediate_size", "hidden_act"]),
        "unet": cfg(unet.config, ["sample_size", "block_out_channels", "layers_per_block", "attention_head_dim",
                                  "norm_num_groups", "use_linear_projection", "cross_attention_dim",
                                  "down_block_types", "mid_block_type", "up_block_types"]),
        "vae": cfg(vae.config, ["block_out_channels", "layers_per_block", "norm_num_groups", "latent_channels"]),
        "scheduler": cfg(sched_cfg, ["num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "clip_sample",
                                     "set_alpha_to_one", "steps_offset", "prediction_type", "timestep_spacing"]),
        "vae_scaling_factor": sf,
        "unet_eps_vs_capture_processor_max_abs_diff": capture_diff,
        "up_block_attn2_layers": up_attn2,
        "attention_layers": attn_meta,
        "attn_probs_layout": "[batch, heads, query_len, key_len]; q = y*w + x; diffusers internal [batch*heads, q, k], "
                             "row b*heads+h",
        "scene": {
            "command": scene_cmd or f"(given folder {args.scene})",
            "scene_json": scene_info,
            "use": "img.png -> vae.encoder_input (and train.x0 via its latent); mask0.png -> masks.image[0] "
                   "(<asset0>), mask1.png -> masks.image[1] (<asset1>); caption -> prompts[1] and the e2e prompt",
        },
        "masks": {
            "source": "world scene masks (meta.scene), thresholded > 127 to 0/1",
            "downsampling": "F.interpolate(mode='nearest'): src = floor(dst*in/out); mifo.mask.* bilinear, "
                            "align_corners=False",
        },
        "mifo": {
            "blocks": mifo_blocks,
            "layers": mifo_layers,
            "alpha": MIFO_ALPHA,
            "reward_weight": MIFO_REWARD_WEIGHT,
            "penalty_weight": MIFO_PENALTY_WEIGHT,
            "sample": "train sample 1 (mifo.* = train.*[1:2]), prompt 0",
        },
        "e2e": {"prompt": caption, "steps": E2E_STEPS, "guidance_scale": GUIDANCE, "eta": 0.0},
        "tolerance_hint": "float32 CPU; expect ~1e-5 relative on forward tensors, ~1e-4 on gradients",
    }
    doc = {
        "meta": meta,
        "tensors": {k: {"shape": list(v.shape), "dtype": str(v.dtype).replace("torch.", ""), "description": D[k]}
                    for k, v in T_.items()},
    }
    save_file(T_, os.path.join(out_dir, "reference.safetensors"))
    with open(os.path.join(out_dir, "reference.json"), "w") as f:
        json.dump(doc, f, indent=1, ensure_ascii=False)
        f.write("\n")
    print(f"wrote {len(T_)} tensors to {os.path.join(out_dir, 'reference.safetensors')} (+ reference.json); "
          f"image {H}x{W}, latent {Ls}, {len(up_attn2)} up-block attn2 layers, mifo layers {len(mifo_layers)}, "
          f"capture-vs-SDPA max |diff| {capture_diff:.2e}")


if __name__ == "__main__":
    main()
