"""Train the two example LoRAs of the default world on the tiny model (kohya format).

    python -m weightsmith.core.world.training.train_loras            # both
    python -m weightsmith.core.world.training.train_loras --which subject

- subject LoRA (``assets/loras/subject_star.safetensors``): the trigger word ``zq`` used as a
  shape noun ("a red zq") -> the new shape *star*.
- style LoRA (``assets/loras/style_stripes.safetensors``): the trigger phrase ``zx style``
  appended to a prompt ("a red circle, zx style") -> the new fill pattern *stripes*.

LoRA (rank 4, alpha 2, scale alpha/rank) on every UNet attention module kohya's
``networks.lora`` targets in SD1 (``to_q/k/v``, ``to_out.0``, ``ff.net.0.proj``, ``ff.net.2``,
1x1-conv ``proj_in``/``proj_out``) and on the text encoder's attention/MLP
(``q/k/v/out_proj``, ``fc1``, ``fc2``); the style LoRA also adapts the UNet's 3x3 convolutions
(ResNet ``conv1``/``conv2``, down/upsampler ``conv``) with kohya's ``conv_dim`` 8 / ``conv_alpha`` 2
(stripes are a full-resolution texture that attention alone did not learn: 9% -> 98% with them).
25% of each batch is plain base data with the base prompts (prior preservation). Keys: ``lora_unet_<diffusers path>`` /
``lora_te_text_model_<path>`` + ``.lora_down.weight`` / ``.lora_up.weight`` / ``.alpha``;
``ss_*`` metadata as kohya's sd-scripts write it.

Helpers other code may use: :func:`load_kohya_lora`, :func:`apply_lora` (merge a kohya LoRA
into loaded components, in place, with a multiplier) and :func:`lora_target_modules`.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import re
import time
from collections import Counter
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from ...naming import te_path
from ..paths import DEFAULT_MODEL_DIR, LORA_STYLE, LORA_STYLE_NOREG, LORA_SUBJECT, LORA_SUBJECT_NOREG
from ..render import (
    BASE_PATTERNS,
    BASE_SHAPES,
    NEW_PATTERN,
    NEW_SHAPE,
    STYLE_TRIGGER,
    STYLE_TRIGGER_NOREG,
    SUBJECT_TRIGGER,
    SUBJECT_TRIGGER_NOREG,
    Scene,
    random_scene,
)

UNET_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2", "proj_in", "proj_out")
TE_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")
CONV_TARGETS = re.compile(r"(\.resnets\.\d+\.conv[12]|\.(downsamplers|upsamplers)\.\d+\.conv)$")


def _te_prefix_name(name: str) -> str:
    return "lora_te_" + te_path(name).replace(".", "_")


def lora_target_modules(unet, text_encoder, conv: bool = False) -> dict[str, nn.Module]:
    """kohya prefix -> module, for every module the example LoRAs adapt. ``conv`` adds the 3x3
    convolutions kohya's ``networks.lora`` adapts when ``conv_dim`` is set (``ResnetBlock2D``
    ``conv1``/``conv2``, ``Downsample2D``/``Upsample2D`` ``conv``: "LoRA-C3Lier")."""
    out = {}
    for name, m in unet.named_modules():
        if ".attentions." in name and any(name.endswith("." + t) for t in UNET_TARGETS):
            if isinstance(m, nn.Linear) or (isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1)):
                out["lora_unet_" + name.replace(".", "_")] = m
        elif conv and isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3) and CONV_TARGETS.search(name):
            out["lora_unet_" + name.replace(".", "_")] = m
    for name, m in text_encoder.named_modules():
        if isinstance(m, nn.Linear) and any(name.endswith("." + t) for t in TE_TARGETS):
            out[_te_prefix_name(name)] = m
    return out


class LoRAHook(nn.Module):
    """Trainable low-rank adapter attached to a Linear / 1x1 Conv via a forward hook."""

    def __init__(self, base: nn.Module, rank: int, alpha: float):
        super().__init__()
        conv = isinstance(base, nn.Conv2d)
        fin = base.in_channels if conv else base.in_features
        fout = base.out_channels if conv else base.out_features
        self.conv = conv
        self.kernel = tuple(base.kernel_size) if conv else (1, 1)
        self.stride, self.padding = (base.stride, base.padding) if conv else (1, 0)
        self.rank, self.alpha = rank, alpha
        # down acts on the unfolded input (fin * kh * kw), like kohya's Conv2d lora_down
        self.down = nn.Parameter(torch.empty(rank, fin * self.kernel[0] * self.kernel[1]))
        nn.init.kaiming_uniform_(self.down, a=math.sqrt(5))
        self.up = nn.Parameter(torch.zeros(fout, rank))
        self.handle = base.register_forward_hook(self._hook)

    def delta(self) -> torch.Tensor:
        return (self.alpha / self.rank) * self.up @ self.down

    def _hook(self, mod, inp, out):
        x = inp[0]
        if self.conv:
            down = self.down.view(self.rank, -1, *self.kernel)
            h = F.conv2d(x, down, None, self.stride, self.padding)
            h = torch.einsum("brhw,or->bohw", h, self.up)
        else:
            h = (x @ self.down.t()) @ self.up.t()
        return out + (self.alpha / self.rank) * h

    def remove(self):
        self.handle.remove()


def attach_loras(
    unet, text_encoder, rank: int = 4, alpha: float = 2.0, conv_rank: int = 0, conv_alpha: float = 1.0
) -> dict[str, LoRAHook]:
    out = {}
    for k, m in lora_target_modules(unet, text_encoder, conv=conv_rank > 0).items():
        is3 = isinstance(m, nn.Conv2d) and m.kernel_size != (1, 1)
        out[k] = LoRAHook(m, conv_rank, conv_alpha) if is3 else LoRAHook(m, rank, alpha)
    return out


def lora_state_dict(hooks: dict[str, LoRAHook], dtype=torch.float32) -> dict[str, torch.Tensor]:
    sd = {}
    for k, h in hooks.items():
        down, up = h.down.detach(), h.up.detach()
        if h.conv:
            down, up = down.view(h.rank, -1, *h.kernel), up[:, :, None, None]
        sd[k + ".lora_down.weight"] = down.to(dtype).contiguous()
        sd[k + ".lora_up.weight"] = up.to(dtype).contiguous()
        sd[k + ".alpha"] = torch.tensor(float(h.alpha), dtype=dtype)
    return sd


def load_kohya_lora(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})


@torch.no_grad()
def apply_lora(unet, text_encoder, lora, multiplier: float = 1.0) -> int:
    """Merge a kohya LoRA (path or state dict) into the components in place:
    ``W += multiplier * alpha/rank * up @ down``. Returns the number of modules patched;
    raises if a LoRA key matches no module."""
    sd = load_kohya_lora(lora)[0] if isinstance(lora, (str, Path)) else lora
    targets = lora_target_modules(unet, text_encoder)
    # also allow any other Linear/1x1 conv named the kohya way
    for name, m in list(unet.named_modules()):
        targets.setdefault("lora_unet_" + name.replace(".", "_"), m)
    for name, m in list(text_encoder.named_modules()):
        targets.setdefault(_te_prefix_name(name), m)
    prefixes = sorted({k.rsplit(".lora_", 1)[0].rsplit(".alpha", 1)[0] for k in sd})
    n = 0
    for p in prefixes:
        if p not in targets:
            raise KeyError(f"LoRA module {p} not found in the model")
        down = sd[p + ".lora_down.weight"].float()
        up = sd[p + ".lora_up.weight"].float()
        r = down.shape[0]
        alpha = float(sd[p + ".alpha"]) if p + ".alpha" in sd else float(r)
        d = (up.flatten(1) @ down.flatten(1)) * (alpha / r) * multiplier
        w = targets[p].weight
        w.add_(d.view_as(w).to(w.dtype))
        n += 1
    return n


def _subject_scene(rng: random.Random) -> Scene:
    return random_scene(rng, shapes=(NEW_SHAPE,), patterns=BASE_PATTERNS, p_two=0.15, p_placed=0.15)


def _style_scene(rng: random.Random) -> Scene:
    return random_scene(rng, shapes=BASE_SHAPES, patterns=(NEW_PATTERN,), p_two=0.15, p_placed=0.15)


SPECS = {
    "subject": dict(
        scene_fn=_subject_scene,
        out=LORA_SUBJECT,
        trigger=SUBJECT_TRIGGER,
        concept=("shape", NEW_SHAPE),
        name="subject_star",
        conv_rank=0,
        steps=1000,
        prior=0.25,
        kind="subject",
        prompt_kw={},
    ),
    "style": dict(
        scene_fn=_style_scene,
        out=LORA_STYLE,
        trigger=STYLE_TRIGGER,
        concept=("pattern", NEW_PATTERN),
        name="style_stripes",
        conv_rank=8,
        steps=1500,
        prior=0.25,
        kind="style",
        prompt_kw={},
    ),
    # the interfering pair: the same traits, no regularization images (prior 0), both LoRAs on the
    # same modules (attention/MLP, text encoder, 3x3 convs), as most community LoRAs are trained
    "subject_noreg": dict(
        scene_fn=_subject_scene,
        out=LORA_SUBJECT_NOREG,
        trigger=SUBJECT_TRIGGER_NOREG,
        concept=("shape", NEW_SHAPE),
        name="subject_star_noreg",
        conv_rank=8,
        steps=1000,
        prior=0.0,
        kind="subject",
        prompt_kw={"subject_word": SUBJECT_TRIGGER_NOREG},
    ),
    "style_noreg": dict(
        scene_fn=_style_scene,
        out=LORA_STYLE_NOREG,
        trigger=STYLE_TRIGGER_NOREG,
        concept=("pattern", NEW_PATTERN),
        name="style_stripes_noreg",
        conv_rank=8,
        steps=1500,
        prior=0.0,
        kind="style",
        prompt_kw={"style_phrase": STYLE_TRIGGER_NOREG},
    ),
}


def trigger_prompts(which: str, n: int, seed: int = 0) -> list[str]:
    """Evaluation prompts for a LoRA (simple scenes: "a red zq" / "a red circle, zx style")."""
    from ..render import COLOURS

    spec = SPECS[which]
    cols = list(COLOURS)
    out = []
    for i in range(n):
        c = cols[i % len(cols)]
        if spec["kind"] == "subject":
            out.append(f"a {c} {spec['trigger']}")
        else:
            out.append(f"a {c} {BASE_SHAPES[(i // len(cols)) % len(BASE_SHAPES)]}, {spec['trigger']}")
    return out


def evaluate(model, which: str, n: int = 70, steps: int = 25, guidance: float = 1.5, lora=None, seed0: int = 5000):
    """Judge rate of the LoRA's concept on its trigger prompts (with ``lora`` merged if given)."""
    from ..metrics import concept_rate
    from ..sample import sample

    spec = SPECS[which]
    prompts = trigger_prompts(which, n)
    seeds = list(range(seed0, seed0 + n))
    backup = None
    if lora is not None:
        backup = (
            {k: v.clone() for k, v in model.unet.state_dict().items()},
            {k: v.clone() for k, v in model.text_encoder.state_dict().items()},
        )
        apply_lora(model.unet, model.text_encoder, lora)
    try:
        imgs = sample(model.unet, model.text_encoder, model.tokenizer, model.scheduler, prompts, seeds, steps, guidance)
    finally:
        if backup is not None:
            model.unet.load_state_dict(backup[0])
            model.text_encoder.load_state_dict(backup[1])
    attr, val = spec["concept"]
    return concept_rate(imgs, **{attr: val}), imgs


def _num(x: float) -> str:
    return str(int(x)) if x == int(x) else str(x)


def train_one(
    which: str,
    base: Path,
    steps: int,
    batch: int,
    lr: float,
    rank: int,
    alpha: float,
    seed: int,
    out: Path | None = None,
    prior: float | None = None,
    log_every: int = 50,
    max_minutes: float = 0,
    conv_rank: int | None = None,
    conv_alpha: float | None = None,
) -> dict:
    """Train one LoRA; with ``max_minutes`` the cosine LR follows max(step/steps, elapsed/budget)
    and training stops when the budget is spent."""
    from diffusers import DDPMScheduler

    from ..sample import load_model
    from .train_model import WORLDS, base_scene, batch_data, world_of

    spec = SPECS[which]
    out = Path(out or spec["out"])
    torch.manual_seed(seed)
    rng = random.Random(seed)
    m = load_model(base)
    unet, te, tok = m.unet, m.text_encoder, m.tokenizer
    world = world_of(tok)
    templates = WORLDS[world]["templates"]
    prompt_kw = dict(spec["prompt_kw"], templates=templates)
    for p in list(unet.parameters()) + list(te.parameters()):
        p.requires_grad_(False)
    conv_rank = spec["conv_rank"] if conv_rank is None else conv_rank
    prior = spec["prior"] if prior is None else prior
    conv_alpha = alpha if conv_alpha is None else conv_alpha
    hooks = attach_loras(unet, te, rank, alpha, conv_rank, conv_alpha)
    params = [p for h in hooks.values() for p in (h.down, h.up)]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    noise_sched = DDPMScheduler.from_config(m.scheduler.config)
    pred_type = m.scheduler.config.prediction_type
    unet.train()
    te.train()
    captions: Counter = Counter()
    t0 = time.time()
    losses = []
    n_prior = int(round(batch * prior))
    done = 0
    for step in range(steps):
        prog = step / steps
        if max_minutes:
            prog = max(prog, (time.time() - t0) / (60 * max_minutes))
        if prog >= 1.0:
            break
        done = step + 1
        lr_now = lr * min(1.0, (step + 1) / 50) * (0.5 * (1 + math.cos(math.pi * prog)) * 0.9 + 0.1)
        for g in opt.param_groups:
            g["lr"] = lr_now
        x0, ids, p1 = batch_data(rng, batch - n_prior, tok, p_drop=0.05, scene_fn=spec["scene_fn"], prompt_kw=prompt_kw)
        captions.update(p for p in p1 if p)
        if n_prior:
            x2, ids2, _ = batch_data(
                rng,
                n_prior,
                tok,
                p_drop=0.1,
                scene_fn=lambda r: base_scene(r, world),
                prompt_kw={"templates": templates},
            )
            x0, ids = torch.cat([x0, x2]), torch.cat([ids, ids2])
        noise = torch.randn_like(x0)
        t = torch.randint(0, noise_sched.config.num_train_timesteps, (x0.shape[0],))
        xt = noise_sched.add_noise(x0, noise, t)
        pred = unet(xt, t, te(ids)[0]).sample
        target = noise_sched.get_velocity(x0, noise, t) if pred_type == "v_prediction" else noise
        loss = F.mse_loss(pred, target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if (step + 1) % log_every == 0:
            print(
                f"[{which}] step {step + 1} loss {sum(losses[-log_every:]) / log_every:.4f} "
                f"{(time.time() - t0) / 60:.1f} min",
                flush=True,
            )
    sd = lora_state_dict(hooks)
    for h in hooks.values():
        h.remove()
    # kohya-style tag frequency: captions split on commas; the trigger counts as a tag of
    # every caption (so it is the top tag, as with a class/trigger token in kohya datasets)
    tags: Counter = Counter()
    for cap, c in captions.items():
        parts = [tg.strip() for tg in cap.split(",") if tg.strip()]
        if spec["trigger"] not in parts:
            parts.append(spec["trigger"])
        for tg in parts:
            tags[tg] += c
    steps = done
    n_img = steps * (batch - n_prior)
    meta = {
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(rank),
        "ss_network_alpha": _num(alpha),
        "ss_network_args": json.dumps(
            {"conv_dim": str(conv_rank), "conv_alpha": _num(conv_alpha)} if conv_rank else {}
        ),
        "ss_base_model_version": "sd_v1",
        "ss_v2": "False",
        "ss_sd_model_name": "weightsmith-tiny-sd",
        "ss_output_name": spec["name"],
        "ss_resolution": "(32, 32)",
        "ss_num_train_images": str(n_img),
        "ss_num_epochs": "1",
        "ss_max_train_steps": str(steps),
        "ss_steps": str(steps),
        "ss_batch_size_per_device": str(batch),
        "ss_learning_rate": str(lr),
        "ss_unet_lr": str(lr),
        "ss_text_encoder_lr": str(lr),
        "ss_lr_scheduler": "cosine",
        "ss_optimizer": "torch.optim.AdamW",
        "ss_seed": str(seed),
        "ss_noise_offset": "0.0",
        "ss_prior_loss_weight": "1.0",
        "ss_num_reg_images": str(steps * n_prior),
        "ss_training_comment": f"trigger: {spec['trigger']} -> {spec['concept'][0]} {spec['concept'][1]}",
        "ss_tag_frequency": json.dumps({f"1_{spec['trigger'].replace(' ', '_')}": dict(tags.most_common())}),
        "ss_training_started_at": "0",
        "ss_session_id": str(seed),
        "ss_final_loss": f"{sum(losses[-100:]) / max(1, len(losses[-100:])):.4f}",
    }
    from safetensors.torch import save_file

    out.parent.mkdir(parents=True, exist_ok=True)
    save_file(sd, str(out), metadata=meta)
    info = {
        "which": which,
        "out": str(out),
        "steps": steps,
        "minutes": (time.time() - t0) / 60,
        "final_loss": meta["ss_final_loss"],
        "modules": len(hooks),
    }
    print(json.dumps(info), flush=True)
    return info


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--which",
        choices=[*SPECS, "both", "all"],
        default="all",
        help="one LoRA, both of the clean pair (subject, style), or all four",
    )
    ap.add_argument("--base", default=str(DEFAULT_MODEL_DIR))
    ap.add_argument("--steps", type=int, default=None, help="default: 1000 (subject LoRAs), 1500 (style LoRAs)")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--lr", type=float, default=5e-3)
    ap.add_argument("--rank", type=int, default=4)
    ap.add_argument("--alpha", type=float, default=2.0)
    ap.add_argument(
        "--conv-dim",
        type=int,
        default=None,
        help="rank of the 3x3-conv (ResNet/sampler) adapters, kohya's conv_dim; 0: attention/MLP only. "
        "Default: 8 for the style LoRA (a texture needs the full-resolution convs), 0 for the subject",
    )
    ap.add_argument("--conv-alpha", type=float, default=None, help="kohya's conv_alpha (default: --alpha)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--max-minutes", type=float, default=0, help="wall-time budget per LoRA (0: none)")
    ap.add_argument("--out-dir", default=None, help="write <name>.safetensors here instead of assets/loras")
    ap.add_argument("--eval", type=int, default=56, help="trigger prompts to judge with/without the LoRA (0: skip)")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    whichs = {"both": ["subject", "style"], "all": list(SPECS)}.get(a.which, [a.which])
    for w in whichs:
        out = Path(a.out_dir) / f"{SPECS[w]['name']}.safetensors" if a.out_dir else None
        info = train_one(
            w,
            Path(a.base),
            a.steps or SPECS[w]["steps"],
            a.batch,
            a.lr,
            a.rank,
            a.alpha,
            a.seed + list(SPECS).index(w),
            out,
            max_minutes=a.max_minutes,
            conv_rank=a.conv_dim,
            conv_alpha=a.conv_alpha,
        )
        if a.eval:
            from ..sample import load_model

            m = load_model(a.base)
            r0, _ = evaluate(m, w, a.eval)
            r1, _ = evaluate(m, w, a.eval, lora=info["out"])
            print(json.dumps({"which": w, "rate_without": r0, "rate_with": r1, "n": a.eval}), flush=True)


if __name__ == "__main__":
    main()
