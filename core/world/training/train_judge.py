"""Train the judge CNN on fresh renders (all shapes incl. the reserved star, all patterns).

    python -m weightsmith.core.world.training.train_judge --out weightsmith/core/world/assets/judge.safetensors

Augmentation (so it also reads imperfect model samples): gaussian pixel noise, mild blur,
small per-channel colour shifts. ~10 min on 1 CPU core with the defaults.
"""

from __future__ import annotations

import argparse
import json
import random
import time

import numpy as np
import torch
import torch.nn.functional as F

from ..judge import JudgeNet, attribute_accuracy, scene_targets
from ..paths import JUDGE_PATH
from ..render import PATTERNS, SHAPES, random_scene, render


def make_batch(rng: random.Random, n: int):
    scenes = [random_scene(rng, shapes=SHAPES, patterns=PATTERNS, p_two=0.35, p_placed=0.25) for _ in range(n)]
    imgs = np.stack([render(s, seed=rng.randrange(1 << 30)) for s in scenes])
    x = torch.from_numpy(imgs).permute(0, 3, 1, 2).float() / 255.0
    return scenes, x


def augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    n = x.shape[0]
    blur = F.avg_pool2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
    wb = (torch.rand(n, 1, 1, 1, generator=g) < 0.3).float() * torch.rand(n, 1, 1, 1, generator=g)
    x = x * (1 - wb) + blur * wb
    x = x + (torch.rand(n, 3, 1, 1, generator=g) - 0.5) * 0.08
    x = x + torch.randn(x.shape, generator=g) * torch.rand(n, 1, 1, 1, generator=g) * 0.06
    return x.clamp(0, 1)


def loss_fn(out, t):
    loss = F.cross_entropy(out["background"], t["background"])
    for name in ("shape", "colour", "pattern", "size"):
        loss = loss + F.cross_entropy(out[name].flatten(0, 1), t[name].flatten(), ignore_index=-100)
    return loss


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", default=str(JUDGE_PATH))
    ap.add_argument("--steps", type=int, default=2500)
    ap.add_argument("--batch", type=int, default=96)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--eval-n", type=int, default=2000)
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    rng = random.Random(a.seed)
    g = torch.Generator().manual_seed(a.seed)
    model = JudgeNet()
    opt = torch.optim.AdamW(model.parameters(), lr=a.lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=a.lr, total_steps=a.steps, pct_start=0.1)
    t0 = time.time()
    model.train()
    for step in range(1, a.steps + 1):
        scenes, x = make_batch(rng, a.batch)
        out = model(augment(x, g))
        loss = loss_fn(out, scene_targets(scenes))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % 100 == 0:
            print(f"step {step} loss {loss.item():.4f} {(time.time() - t0) / 60:.1f} min", flush=True)
    model.eval()
    # held-out: a different seed stream, clean renders
    hrng = random.Random(10_000 + a.seed)
    scenes, x = make_batch(hrng, a.eval_n)
    acc = attribute_accuracy(scenes, x, model)
    print("held-out accuracy", json.dumps(acc), flush=True)
    from safetensors.torch import save_file

    save_file(
        {k: v.contiguous() for k, v in model.state_dict().items()},
        a.out,
        metadata={"format": "pt", "steps": str(a.steps), "seed": str(a.seed), "heldout_accuracy": json.dumps(acc)},
    )
    print("saved", a.out, flush=True)


if __name__ == "__main__":
    main()
