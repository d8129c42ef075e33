#!/usr/bin/env python3
"""Reference tensors for MIFO's synthesis, made by the released MIFO code itself.

Runs the synthesis of the released code (Kareneveve/MIFO, commit 27ca72c: its
`StableDiffusionPipeline` subclass, `register_attention_editor_diffusers` and `BoundedAttention`)
on a small diffusers model and a fixed input, and records what mifo's synthesis must reproduce:

* `synth.latent.{i}`           the latent entering denoising step i (i = 0: the initial noise);
* `synth.iterate.{i}.{j}`      the latent of gradient iteration j of guided step i;
* `synth.loss.{i}.{j}`         the box loss of that iteration (the code's summed form);
* `synth.grad.{i}.{j}`         its gradient with respect to the latent;
* `synth.alpha`                α of every loss-term evaluation, in call order (CA, SA per iteration);
* `synth.beta`                 the step size of each guided step;
* `synth.guided.{i}`           the latent after the optimisation of guided step i;
* `synth.mask.<tap>`           the masks (1 = hidden) the code adds to one layer's logits in one
                               pass, cond half, `[queries, keys]`;
* `synth.refine.*`             the first mask refinement: the running-mean self- and
                               cross-attention maps it read, the K-means labels and centres, the
                               refined masks.

Nothing of the released code is copied into mifo: this script imports it from a checkout.
Modules the synthesis path imports only for debug images, LoRA loading and seeding (torchvision,
lora_diffusion, pytorch_lightning, the code's plotting utils) are replaced by empty stand-ins;
`torch_kmeans`, `einops` and `nltk` must be installed (`pip install --no-deps torch_kmeans einops
nltk`; nltk is imported, never used: the token indices are given).

    git clone https://github.com/Kareneveve/MIFO /tmp/MIFO && git -C /tmp/MIFO checkout 27ca72c
    python3 tools/make_synth_reference.py --mifo-code /tmp/MIFO --model fixtures/tiny-sd21
    python3 tools/make_synth_reference.py --mifo-code /tmp/MIFO --model fixtures/world-sd \
        --prompt "a photo of a red circle and a blue square" --subjects "red circle,blue square" \
        --boxes "0.125,0.125,0.5,0.5625;0.5,0.4375,0.875,0.875" \
        --loss-layers up_blocks.1,up_blocks.2 --cluster-layers up_blocks.2
"""

import argparse
import json
import pathlib
import subprocess
import sys
import types

import torch
from safetensors.torch import save_file

STEPS = 8
GUIDED = 5  # guided steps = the code's min_clustering_step: the first refinement at step 5
GD_ITERS = 5
SEED = 0


def stub_modules():
    """Empty stand-ins for imports the synthesis path does not use here."""
    def module(name, **attrs):
        m = types.ModuleType(name)
        m.__dict__.update(attrs)
        sys.modules[name] = m
        return m

    def unused(*_a, **_k):
        raise RuntimeError("a stubbed function was called")

    tv = module("torchvision")
    tv.utils = module("torchvision.utils", save_image=unused)
    tv.io = module("torchvision.io", read_image=unused)
    module("lora_diffusion", inject_trainable_lora=unused)
    module("pytorch_lightning", seed_everything=unused)
    module("Semantic_synthesis_util.utils", display_attention_maps=unused)


def attention_order(unet, latent, t, context):
    """Module paths of the attention layers in the order one forward calls them."""
    order = []
    hooks = [
        m.register_forward_pre_hook(lambda _m, _a, name=name: order.append(name))
        for name, m in unet.named_modules()
        if type(m).__name__ == "Attention"
    ]
    with torch.no_grad():
        unet(latent, t, encoder_hidden_states=context)
    for h in hooks:
        h.remove()
    return order


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--mifo-code", required=True, help="checkout of Kareneveve/MIFO (27ca72c)")
    ap.add_argument("--model", required=True, help="diffusers SD folder (fixtures/tiny-sd21)")
    ap.add_argument("--out", help="output stem (default: <model>/synth_reference)")
    ap.add_argument("--prompt", default="a photo of a red cube and a blue ball")
    ap.add_argument("--subjects", default="red cube,blue ball", help="comma-separated, box order")
    ap.add_argument("--boxes", default="0.0625,0.125,0.5,0.625;0.5625,0.3125,0.9375,0.875",
                    help="x0,y0,x1,y1 per subject, ';'-separated")
    ap.add_argument("--loss-layers", default="up_blocks.2,up_blocks.3",
                    help="mifo's synth.loss_layers (module-path prefixes)")
    ap.add_argument("--cluster-layers", default="up_blocks.2",
                    help="mifo's synth.cluster_layers (one resolution)")
    args = ap.parse_args()
    PROMPT = args.prompt
    SUBJECTS = args.subjects.split(",")
    BOXES = [[float(v) for v in b.split(",")] for b in args.boxes.split(";")]
    code = pathlib.Path(args.mifo_code).resolve()
    model_dir = pathlib.Path(args.model)
    out = pathlib.Path(args.out) if args.out else model_dir / "synth_reference"
    commit = subprocess.run(["git", "-C", str(code), "rev-parse", "HEAD"],
                            capture_output=True, text=True).stdout.strip() or "unknown"

    # diffusers first: it probes for torchvision, which the stand-ins must not answer.
    from diffusers import DDIMScheduler, StableDiffusionPipeline as _  # noqa: F401

    stub_modules()
    sys.path.insert(0, str(code))
    from Semantic_synthesis_util import bounded_attention as ba
    from Semantic_synthesis_util.injection_utils import register_attention_editor_diffusers
    from Semantic_synthesis_util.pipeline_stable_diffusion_opt import StableDiffusionPipeline

    torch.manual_seed(SEED)
    # The released script's scheduler (its steps_offset is 0).
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              clip_sample=False, set_alpha_to_one=False)
    pipe = StableDiffusionPipeline.from_pretrained(str(model_dir), scheduler=scheduler,
                                                   torch_dtype=torch.float32,
                                                   safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    unet = pipe.unet
    size = unet.config.sample_size
    latent0 = torch.randn(1, unet.config.in_channels, size, size)

    tok = pipe.tokenizer(PROMPT, padding="max_length", max_length=pipe.tokenizer.model_max_length,
                         return_tensors="pt").input_ids
    words = pipe.tokenizer.convert_ids_to_tokens(tok[0])
    eos = words.index(pipe.tokenizer.eos_token)

    def positions(subject):
        parts = [w + "</w>" for w in subject.split()]
        for s in range(1, eos):
            if words[s:s + len(parts)] == parts:
                return list(range(s, s + len(parts)))
        raise SystemExit(f"{subject!r} not in {words[:eos + 1]}")

    subject_indices = [positions(s) for s in SUBJECTS]
    taken = {p for ps in subject_indices for p in ps}
    stop = {"a</w>", "of</w>", "and</w>"}
    filter_indices = [p for p in range(1, eos) if words[p] in stop and p not in taken]

    context = pipe.text_encoder(tok)[0]
    order = attention_order(unet, latent0, torch.tensor(999), context)

    def layers(prefix, kind):
        return [i for i, p in enumerate(order) if p.startswith(prefix + ".") and p.endswith(kind)]

    loss_prefixes, cluster_prefixes = args.loss_layers.split(","), args.cluster_layers.split(",")
    cross_loss = [i for p in loss_prefixes for i in layers(p, "attn2")]
    self_loss = [i for p in loss_prefixes for i in layers(p, "attn1")]
    cross_mask = [i for p in cluster_prefixes for i in layers(p, "attn2")]
    self_mask = [i for p in cluster_prefixes for i in layers(p, "attn1")]
    # Mask taps: the first self- and cross-attention layers of the last loss prefix.
    tap_self, tap_cross = layers(loss_prefixes[-1], "attn1")[0], layers(loss_prefixes[-1], "attn2")[0]

    tensors = {"synth.latent.0": latent0.clone()}
    record = {"alpha": [], "beta": [], "taps": []}

    class Recorder(ba.BoundedAttention):
        """The released editor, unchanged, with its intermediate values recorded."""

        def _get_alpha_cosine(self):
            a = super()._get_alpha_cosine()
            record["alpha"].append(float(a))
            return a

        def _compute_loss(self):
            loss, norm = super()._compute_loss()
            self._losses.append(loss.detach().clone())
            return loss, norm

        def update_loss(self, forward_pass, latents, i):
            if i >= self.max_guidance_iter:
                return super().update_loss(forward_pass, latents, i)
            self._losses, iterates, grads = [], [], []
            record["beta"].append(self.start_step_size + self.step_size_coef * i)

            def recorded_pass(x):
                iterates.append(x[:1].detach().clone())
                return forward_pass(x)

            original_grad = torch.autograd.grad

            def recorded_grad(*a, **k):
                g = original_grad(*a, **k)
                grads.append(g[0].detach().clone())
                return g

            torch.autograd.grad = recorded_grad
            try:
                out = super().update_loss(recorded_pass, latents, i)
            finally:
                torch.autograd.grad = original_grad
            for j, (z, loss, g) in enumerate(zip(iterates, self._losses, grads)):
                tensors[f"synth.iterate.{i}.{j}"] = z
                tensors[f"synth.loss.{i}.{j}"] = loss.reshape(1)
                tensors[f"synth.grad.{i}.{j}"] = g
            tensors[f"synth.guided.{i}"] = out.detach().clone()
            return out

        def _tap(self, masks, kind):
            layer = self.cur_att_layer
            wanted = (kind == "self" and layer == tap_self) or (kind == "cross" and layer == tap_cross)
            phase = "guidance" if self.optimized else "normal"
            name = f"{kind}.step{self.cur_step}.{phase}"
            if wanted and self.cur_step in (0, GUIDED) and not any(t["name"] == name for t in record["taps"]):
                m = masks[-1, 0]  # cond half, [queries, keys]
                tensors[f"synth.mask.{name}"] = (m == torch.finfo(m.dtype).min).float()
                record["taps"].append({"name": name, "step": self.cur_step, "pass": phase,
                                       "kind": kind, "layer": layer, "path": order[layer]})
            return masks

        def _hide_other_subjects_from_tokens(self, *a, **k):
            return self._tap(super()._hide_other_subjects_from_tokens(*a, **k), "cross")

        def _hide_other_subjects_from_subjects(self, *a, **k):
            return self._tap(super()._hide_other_subjects_from_subjects(*a, **k), "self")

        def _build_self_masks(self):
            first = "synth.refine.masks" not in tensors
            if first:
                tensors["synth.refine.self_map"] = self.mean_self_map[0].detach().clone()
                tensors["synth.refine.cross_map"] = self.mean_cross_map[0].detach().clone()
            masks = super()._build_self_masks()
            if first:
                tensors["synth.refine.masks"] = masks[0].float().clone()
                record["refine_step"] = self.cur_step
            return masks

        def _cluster_self_maps(self):
            c, clusters = super()._cluster_self_maps()
            if "synth.refine.labels" not in tensors:
                tensors["synth.refine.labels"] = clusters[0].to(torch.int64).clone()
                tensors["synth.refine.centres"] = self.centers[0].detach().clone()
            return c, clusters

    editor = Recorder(
        BOXES, [PROMPT], subject_indices,
        cross_loss_layers=cross_loss, self_loss_layers=self_loss,
        cross_mask_layers=cross_mask, self_mask_layers=self_mask,
        eos_token_index=eos, filter_token_indices=filter_indices,
        leading_token_indices=[ps[-1] for ps in subject_indices],
        alpha_max=0.4, alpha_stage1_end=0.1, alpha_final=0.01, stage1_steps=3, alpha_desc=True,
        cross_loss_coef=1.5, self_loss_coef=0.5,
        max_guidance_iter=GUIDED, max_guidance_iter_per_step=GD_ITERS,
        start_step_size=8, end_step_size=2, loss_stopping_value=0.2,
        min_clustering_step=GUIDED, num_clusters_per_box=3,
        debug=False, map_dir=None,
    )
    register_attention_editor_diffusers(pipe, editor)

    original_step = pipe.step
    stepped = []

    def recorded_step(*a, **k):
        x_prev, x0 = original_step(*a, **k)
        stepped.append(x_prev.detach().clone())
        tensors[f"synth.latent.{len(stepped)}"] = x_prev.detach().clone()
        return x_prev, x0

    pipe.step = recorded_step
    pipe([PROMPT], latents=latent0.clone(), guidance_scale=7.5, num_inference_steps=STEPS,
         height=size * 8, width=size * 8, device=torch.device("cpu"))

    tensors["synth.alpha"] = torch.tensor(record["alpha"], dtype=torch.float64)
    tensors["synth.beta"] = torch.tensor(record["beta"], dtype=torch.float64)
    tensors["synth.timesteps"] = pipe.scheduler.timesteps.to(torch.int64).clone()
    tensors = {k: v.contiguous() for k, v in tensors.items()}
    save_file(tensors, str(out) + ".safetensors")
    iterations = {str(i): sum(1 for k in tensors if k.startswith(f"synth.loss.{i}."))
                  for i in range(GUIDED)}
    meta = {
        "description": "mifo's synthesis checked against the released MIFO code; see the script",
        "generator": "tools/make_synth_reference.py",
        "released_code": {"repo": "Kareneveve/MIFO", "commit": commit},
        "torch": torch.__version__,
        "prompt": PROMPT,
        "subjects": SUBJECTS,
        "boxes": BOXES,
        "subject_token_indices": subject_indices,
        "filter_token_indices": filter_indices,
        "eos_token_index": eos,
        "seed": SEED,
        "config": {
            "steps": STEPS, "guided_steps": GUIDED, "gd_iters": GD_ITERS,
            # diffusers' StableDiffusionPipeline.__init__ resets a steps_offset of 0 to 1, so the
            # released code, whose script builds its scheduler without one, runs with 1.
            "guidance_scale": 7.5, "steps_offset": pipe.scheduler.config.steps_offset,
            "loss_layers": loss_prefixes, "cluster_layers": cluster_prefixes,
        },
        "layers": {"cross_loss": cross_loss, "self_loss": self_loss,
                   "cross_mask": cross_mask, "self_mask": self_mask, "order": order},
        "iterations": iterations,
        "refine_step": record.get("refine_step"),
        "taps": record["taps"],
    }
    doc = {"meta": meta, "tensors": {k: list(v.shape) for k, v in sorted(tensors.items())}}
    pathlib.Path(str(out) + ".json").write_text(json.dumps(doc, indent=1) + "\n")
    print(f"wrote {out}.safetensors ({len(tensors)} tensors), iterations per guided step "
          f"{iterations}, refinement at step {record.get('refine_step')}, taps "
          f"{[t['name'] for t in record['taps']]}")


if __name__ == "__main__":
    main()
