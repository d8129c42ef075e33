#!/usr/bin/env python3
"""How well a world model follows box control's attention masks alone (no latent optimisation,
no refinement): two-object prompts sampled under the masks of mifo's box control (the same
masks stage 3 of train_world_sd.py trains with), the first object boxed bottom-right and the
second top-left, and a count of the samples in which more than half of each object's pixels
(read by colour) lie in its own box.

    python tools/world/box_follow.py --model fixtures/world-sd [--no-mask] [--grid out.png]

Measured numbers are in fixtures/world-sd/README.md. Requires torch, diffusers, transformers.
"""

import argparse
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import train_world_sd as T  # noqa: E402

from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel  # noqa: E402
from transformers import CLIPTextModel, CLIPTokenizer  # noqa: E402

PROMPTS = ["a photo of a red circle and a blue square", "a photo of a green triangle and a yellow circle"]
# Pixel boxes (x0, y0, x1, y1): the first object bottom-right, the second top-left.
BOXES = np.array([[[36, 34, 60, 58], [4, 4, 28, 28]]])
COLOURS = {"red": (220, 40, 40), "blue": (40, 70, 220), "green": (40, 170, 60), "yellow": (235, 200, 40)}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--samples", type=int, default=8, help="samples per prompt (seed 0's batch)")
    ap.add_argument("--no-mask", action="store_true", help="sample without the masks (the baseline)")
    ap.add_argument("--grid", help="write the images here (PNG)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    unet = UNet2DConditionModel.from_pretrained(os.path.join(args.model, "unet")).eval()
    te = CLIPTextModel.from_pretrained(os.path.join(args.model, "text_encoder")).eval()
    vae = AutoencoderKL.from_pretrained(os.path.join(args.model, "vae")).eval()
    tok = CLIPTokenizer.from_pretrained(T.TOKENIZER_SRC)
    store = {"on": False, "maps": []}
    T.capture_cross_attention(unet, store)
    stop = [tok.convert_tokens_to_ids(w + "</w>") for w in ("a", "of", "and")]
    sched = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                          clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    n = args.samples
    rows, hits, total = [], 0, 0
    latent = unet.config.sample_size
    size = latent * 8
    res = [latent >> i for i in range(len(unet.config.block_out_channels))]
    with torch.no_grad():
        for prompt in PROMPTS:
            ids = T.tokenize(tok, [prompt] * n)
            pos = T.word_positions(tok, ids)
            uids = T.tokenize(tok, [""] * n)
            ctx = torch.cat([te(uids)[0], te(ids)[0]])
            all_ids = torch.cat([uids, ids])
            all_pos = torch.cat([torch.full_like(pos, -1), pos])
            masked = torch.ones(2 * n, dtype=torch.bool)
            cond = torch.cat([torch.zeros(n, dtype=torch.bool), torch.ones(n, dtype=torch.bool)])
            sa, ca = T.box_control_masks(np.repeat(BOXES, 2 * n, 0), masked, cond, all_ids, all_pos, stop, res, size)
            lat = torch.randn((n, 4, latent, latent), generator=torch.Generator().manual_seed(0))
            sched.set_timesteps(50)
            for t in sched.timesteps:
                if not args.no_mask:
                    store["sa"], store["ca"] = sa, ca
                eps = unet(torch.cat([lat, lat]), t, encoder_hidden_states=ctx).sample
                store.pop("sa", None)
                store.pop("ca", None)
                eu, ec = eps.chunk(2)
                lat = sched.step(eu + 7.5 * (ec - eu), t, lat).prev_sample
            img = vae.decode(lat / vae.config.scaling_factor).sample
            img = ((img / 2 + 0.5).clamp(0, 1) * 255).round().byte().permute(0, 2, 3, 1).numpy()
            rows.append(np.concatenate(list(img), 1))
            objects = [w.replace("a ", "", 1) for w in prompt.replace("a photo of ", "").split(" and ")]
            for i in range(n):
                ok = True
                for k, obj in enumerate(objects):
                    near = np.abs(img[i].astype(int) - np.array(COLOURS[obj.split()[0]])).sum(-1) < 120
                    ys, xs = np.nonzero(near)
                    x0, y0, x1, y1 = BOXES[0, k]
                    ok &= len(xs) > 0 and ((xs >= x0) & (xs < x1) & (ys >= y0) & (ys < y1)).mean() > 0.5
                hits += bool(ok)
                total += 1
    print(f"{args.model}{' (no masks)' if args.no_mask else ''}: both objects in their own boxes in {hits} of {total} samples")
    if args.grid:
        from PIL import Image
        Image.fromarray(np.concatenate(rows, 0)).save(args.grid)


if __name__ == "__main__":
    main()
