#!/usr/bin/env python3
"""Reference numbers for mifo's optimiser test (tests/learn_optim.rs).

Computes, in plain float64 Python (no mifo code, no numpy), what PyTorch does for
`torch.nn.utils.clip_grad_norm_(params, max_norm)` followed by `torch.optim.AdamW.step()`
(the update rule of torch/optim/adamw.py, amsgrad off), for two parameter tensors over three
steps with a different learning rate each step: the first step's gradients are large enough to
be clipped, the later ones are not. Writes fixtures/reference/adamw_clip.json.

Run from the checkout: python3 tools/reference/optim_reference.py
"""

import json
import math
import os
import random

BETA1 = 0.9
BETA2 = 0.99
EPS = 1e-8
WEIGHT_DECAY = 0.01
MAX_NORM = 1.0
# torch.nn.utils.clip_grad_norm_ adds this to the norm before dividing.
CLIP_EPS = 1e-6
LRS = [5e-3, 3e-3, 1e-3]
# Gradient magnitude per step: step 1 is clipped (global norm > MAX_NORM), 2 and 3 are not.
GRAD_SCALES = [2.0, 0.1, 0.05]
SHAPES = {"a": [2, 3], "b": [4]}


def numel(shape):
    n = 1
    for d in shape:
        n *= d
    return n


def main():
    rng = random.Random(21)
    params = {
        name: [rng.uniform(-1.0, 1.0) for _ in range(numel(shape))]
        for name, shape in SHAPES.items()
    }
    initial = {name: list(values) for name, values in params.items()}
    first = {name: [0.0] * len(v) for name, v in params.items()}
    second = {name: [0.0] * len(v) for name, v in params.items()}
    steps = []
    for step, (lr, scale) in enumerate(zip(LRS, GRAD_SCALES), start=1):
        grads = {
            name: [scale * rng.uniform(-1.0, 1.0) for _ in range(len(v))]
            for name, v in params.items()
        }
        # clip_grad_norm_: one global L2 norm over every gradient; scale by
        # max_norm / (norm + 1e-6), clamped to at most 1.
        norm = math.sqrt(sum(g * g for gs in grads.values() for g in gs))
        coef = min(MAX_NORM / (norm + CLIP_EPS), 1.0)
        bias1 = 1.0 - BETA1**step
        bias2 = 1.0 - BETA2**step
        for name in params:
            p, m, v = params[name], first[name], second[name]
            for i in range(len(p)):
                g = grads[name][i] * coef
                # Decoupled weight decay first, then the Adam step on the decayed weight.
                p[i] *= 1.0 - lr * WEIGHT_DECAY
                m[i] = BETA1 * m[i] + (1.0 - BETA1) * g
                v[i] = BETA2 * v[i] + (1.0 - BETA2) * g * g
                denom = math.sqrt(v[i]) / math.sqrt(bias2) + EPS
                p[i] -= (lr / bias1) * m[i] / denom
        steps.append(
            {
                "lr": lr,
                "grads": grads,
                "grad_norm": norm,
                "clip_coef": coef,
                "params": {k: list(v) for k, v in params.items()},
                "m": {k: list(v) for k, v in first.items()},
                "v": {k: list(v) for k, v in second.items()},
            }
        )
    fixture = {
        "about": "torch clip_grad_norm_ + AdamW, computed by tools/reference/optim_reference.py",
        "beta1": BETA1,
        "beta2": BETA2,
        "eps": EPS,
        "weight_decay": WEIGHT_DECAY,
        "max_norm": MAX_NORM,
        "shapes": SHAPES,
        "initial": initial,
        "steps": steps,
    }
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    out = os.path.join(root, "fixtures", "reference", "adamw_clip.json")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        json.dump(fixture, f, indent=1)
        f.write("\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
