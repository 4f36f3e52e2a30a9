"""Train the tiny pixel-space text-to-image model of the default world.

    python -m weightsmith.core.world.training.train_model --threads 2 --steps 6500 --max-minutes 138

Components are the stock SD classes (``transformers.CLIPTextModel`` + ``CLIPTokenizer``,
``diffusers.UNet2DConditionModel`` with cross-attention, ``DDIMScheduler``) so every
erase/merge code path runs on it unchanged. Training: DDPM on 32x32 RGB renders of
:mod:`render` (freshly rendered every step, base shapes/patterns only) with a linear beta
schedule rescaled to zero terminal SNR and v-prediction, the text encoder trained jointly
from scratch (after a short warm-up on an auxiliary attribute loss, World v2), 10% text dropout
(empty prompt) for classifier-free guidance, AdamW + cosine LR,
EMA of the weights (the EMA weights are exported). ``--max-minutes`` makes the run fit a wall
time budget (the LR schedule then follows elapsed time). See assets/tiny-sd/README.md for the
exact commands and phases of the shipped run.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ...naming import te_path
from ..paths import DEFAULT_MODEL_DIR
from ..render import BASE_PATTERNS, BASE_SHAPES, COLOURS, POSITIONS, prompt_corpus, prompt_for, random_scene, render
from ..tokenizer import build_tokenizer_files, load_tokenizer

TEXT_DIM = 64
TEXT_LAYERS = 4
TEXT_MLP = 4 * TEXT_DIM

#: recipe presets: World v2, the shipped world (SD-shaped conditioning: 77 positions, 256 wide; many
#: placed and two-object scenes; more phrasings), and the first world's recipe v1 (no longer shipped)
WORLDS = {
    "v1": dict(text_dim=64, text_layers=4, text_mlp=256, context=32, p_two=0.2, p_placed=0.1, templates="v1"),
    "v2": dict(
        text_dim=256,
        text_layers=4,
        text_mlp=512,
        context=77,
        p_two=0.4,
        p_placed=0.25,
        templates="v2",
        aux_weight=0.1,
        te_warmup=100,
    ),
}


# ---------------------------------------------------------------- auxiliary attribute loss
#: what the prompt always says about each object, read back from the text encoder's pooled (EOS)
#: output by a linear head during training only (the head is not exported): object 1 and 2 shape,
#: colour, position ("none" for a missing second object)
_AUX_FIELDS = (("shape", BASE_SHAPES), ("colour", tuple(COLOURS)), ("position", POSITIONS))


def aux_classes() -> list[int]:
    return [len(v) + (1 if slot else 0) for slot in (0, 1) for _, v in _AUX_FIELDS]


def aux_labels(scenes, prompts) -> torch.Tensor:
    """(n, 2 objects × fields) class indices; -100 (ignored) for empty prompts."""
    rows = []
    for sc, pr in zip(scenes, prompts):
        if not pr:
            rows.append([-100] * (2 * len(_AUX_FIELDS)))
            continue
        row = []
        for slot in (0, 1):
            for name, vals in _AUX_FIELDS:
                if slot < len(sc.objects):
                    row.append(vals.index(getattr(sc.objects[slot], name)))
                else:
                    row.append(len(vals))  # "none"
        rows.append(row)
    return torch.tensor(rows, dtype=torch.long)


class AuxHead(torch.nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.sizes = aux_classes()
        self.lin = torch.nn.Linear(dim, sum(self.sizes))

    def loss(self, pooled: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        logits = self.lin(pooled).split(self.sizes, dim=-1)
        return sum(F.cross_entropy(lg, labels[:, i], ignore_index=-100) for i, lg in enumerate(logits)) / len(logits)

    @torch.no_grad()
    def accuracy(self, pooled: torch.Tensor, labels: torch.Tensor) -> float:
        logits = self.lin(pooled).split(self.sizes, dim=-1)
        keep = labels[:, 0] >= 0
        ok = torch.stack([lg.argmax(-1) == labels[:, i] for i, lg in enumerate(logits)], 1)[keep]
        return float(ok.all(1).float().mean()) if keep.any() else float("nan")


def make_text_encoder(tokenizer, dim: int = TEXT_DIM, layers: int = TEXT_LAYERS, mlp: int = TEXT_MLP):
    from transformers import CLIPTextConfig, CLIPTextModel

    cfg = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=dim,
        intermediate_size=mlp,
        projection_dim=dim,
        num_hidden_layers=layers,
        num_attention_heads=4,
        max_position_embeddings=tokenizer.model_max_length,
        hidden_act="quick_gelu",
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return CLIPTextModel(cfg)


UNET_CHANNELS = (32, 64, 64)


def make_unet(channels=UNET_CHANNELS, cross_dim: int = TEXT_DIM):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=32,
        in_channels=3,
        out_channels=3,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        mid_block_type="UNetMidBlock2DCrossAttn",
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=tuple(channels),
        layers_per_block=1,
        cross_attention_dim=cross_dim,
        attention_head_dim=4,
        norm_num_groups=8,
    )


def make_scheduler(prediction_type: str = "v_prediction", zero_snr: bool = True):
    from diffusers import DDIMScheduler

    return DDIMScheduler(
        num_train_timesteps=1000,
        beta_start=1e-4,
        beta_end=0.02,
        beta_schedule="linear",
        clip_sample=True,
        clip_sample_range=1.0,
        set_alpha_to_one=True,
        steps_offset=0,
        prediction_type=prediction_type,
        rescale_betas_zero_snr=zero_snr,
        timestep_spacing="trailing",
    )


MODEL_INDEX = {
    "_class_name": "StableDiffusionPipeline",
    "_diffusers_version": None,
    "feature_extractor": [None, None],
    "image_encoder": [None, None],
    "requires_safety_checker": False,
    "safety_checker": [None, None],
    "scheduler": ["diffusers", "DDIMScheduler"],
    "text_encoder": ["transformers", "CLIPTextModel"],
    "tokenizer": ["transformers", "CLIPTokenizer"],
    "unet": ["diffusers", "UNet2DConditionModel"],
    "vae": [None, None],
}


def _prefix_text_model(path: Path) -> None:
    """Store text-encoder keys as ``text_model.*`` like every SD checkpoint (transformers 5
    may save them unprefixed; ``from_pretrained`` loads either form)."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    sd = load_file(str(path))
    if all(k.startswith("text_model.") for k in sd):
        return
    save_file({te_path(k): v for k, v in sd.items()}, str(path), metadata=meta)


def export(out: Path, unet, text_encoder, tokenizer, scheduler, tok_src: Path | None = None):
    """Write a diffusers-format folder (no VAE: pixel space)."""
    import shutil

    import diffusers

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    unet.save_pretrained(out / "unet", safe_serialization=True)
    text_encoder.save_pretrained(out / "text_encoder", safe_serialization=True)
    _prefix_text_model(out / "text_encoder" / "model.safetensors")
    (out / "tokenizer").mkdir(exist_ok=True)
    if tok_src is not None:
        for f in ("vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json"):
            shutil.copy(Path(tok_src) / f, out / "tokenizer" / f)
    else:
        tokenizer.save_pretrained(out / "tokenizer")
    scheduler.save_pretrained(out / "scheduler")
    idx = dict(MODEL_INDEX, _diffusers_version=diffusers.__version__)
    (out / "model_index.json").write_text(json.dumps(idx, indent=2) + "\n")


def world_of(tokenizer) -> str:
    """The recipe preset a trained model follows, read from its tokenizer's context length."""
    ctx = tokenizer.model_max_length
    for name, w in WORLDS.items():
        if w["context"] == ctx:
            return name
    raise ValueError(f"no world preset has a {ctx}-token context")


def base_scene(rng: random.Random, world: str = "v1"):
    """Base training distribution: v1 70% one centred object, 10% one placed, 20% two objects
    (v2: 35% / 25% / 40%)."""
    w = WORLDS[world]
    return random_scene(rng, shapes=BASE_SHAPES, patterns=BASE_PATTERNS, p_two=w["p_two"], p_placed=w["p_placed"])


def batch_data(
    rng: random.Random,
    n: int,
    tokenizer,
    p_drop: float = 0.1,
    scene_fn=None,
    prompt_kw=None,
    scenes_out: list | None = None,
):
    scene_fn = scene_fn or base_scene
    scenes = [scene_fn(rng) for _ in range(n)]
    if scenes_out is not None:
        scenes_out.extend(scenes)
    imgs = np.stack([render(s, seed=rng.randrange(1 << 30)) for s in scenes])
    x = torch.from_numpy(imgs).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)
    ids, prompts = batch_prompts(rng, scenes, tokenizer, p_drop, prompt_kw)
    return x, ids, prompts


def batch_prompts(rng: random.Random, scenes, tokenizer, p_drop: float = 0.1, prompt_kw=None):
    """(token ids, prompts) for ``scenes``; a prompt is dropped (empty) with probability ``p_drop``."""
    prompts = [("" if rng.random() < p_drop else prompt_for(s, rng, **(prompt_kw or {}))) for s in scenes]
    ids = tokenizer(
        prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
    ).input_ids
    return ids, prompts


class EMA:
    def __init__(self, modules, decay=0.999):
        self.decay = decay
        self.params = [p for m in modules for p in m.parameters()]
        self.shadow = [p.detach().clone() for p in self.params]

    @torch.no_grad()
    def update(self, step):
        d = min(self.decay, (1 + step) / (10 + step))
        for s, p in zip(self.shadow, self.params):
            s.mul_(d).add_(p.detach(), alpha=1 - d)

    @torch.no_grad()
    def swap(self):
        for s, p in zip(self.shadow, self.params):
            tmp = p.detach().clone()
            p.copy_(s)
            s.copy_(tmp)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(DEFAULT_MODEL_DIR))
    ap.add_argument("--work", default="/tmp/weightsmith_world_model", help="checkpoints / logs")
    ap.add_argument("--steps", type=int, default=6000)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=8e-4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument(
        "--max-minutes",
        type=float,
        default=0,
        help="wall-time budget: stop (and export) after it; the LR schedule then follows "
        "max(step/steps, elapsed/budget) so it fully decays on a busy machine too",
    )
    ap.add_argument("--min-snr", type=float, default=5.0, help="min-SNR-gamma loss weighting (0: off) ...")
    ap.add_argument(
        "--min-snr-until",
        type=int,
        default=500,
        help="... for the first N steps only (it starves low-noise steps, which leaves grain)",
    )
    ap.add_argument("--ema-decay", type=float, default=0.999)
    ap.add_argument("--channels", default=",".join(map(str, UNET_CHANNELS)), help="UNet block_out_channels")
    ap.add_argument(
        "--world",
        choices=list(WORLDS),
        default="v2",
        help="recipe preset: v2 = the shipped model (77-position, 256-wide text conditioning, "
        "compositional data); v1 = the first world's recipe (32 positions, 64 wide; no longer "
        "shipped). See assets/tiny-sd/README.md",
    )
    ap.add_argument("--prediction-type", choices=["v_prediction", "epsilon"], default="v_prediction")
    ap.add_argument("--no-zero-snr", action="store_true", help="keep the plain linear betas (non-zero terminal SNR)")
    ap.add_argument("--ckpt-every", type=int, default=250)
    ap.add_argument("--export-every", type=int, default=1000)
    ap.add_argument(
        "--aux-weight",
        type=float,
        default=None,
        help="weight of the auxiliary attribute loss on the text encoder's pooled output "
        "(default: the world preset's; v1 0, v2 0.1)",
    )
    ap.add_argument(
        "--te-warmup",
        type=int,
        default=None,
        help="steps of text-encoder-only training on the attribute loss before the joint run "
        "(prompts only, no images; default: the preset's; v1 0, v2 100)",
    )
    ap.add_argument("--resume", action="store_true")
    a = ap.parse_args(argv)

    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    rng = random.Random(a.seed)
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    w = WORLDS[a.world]
    tok_dir = build_tokenizer_files(work / "tokenizer", prompt_corpus(w["templates"]), w["context"])
    tokenizer = load_tokenizer(tok_dir)
    text_encoder = make_text_encoder(tokenizer, w["text_dim"], w["text_layers"], w["text_mlp"])
    unet = make_unet(tuple(int(c) for c in a.channels.split(",")), w["text_dim"])

    def scene_fn(r):
        return base_scene(r, a.world)

    prompt_kw = {"templates": w["templates"]}
    scheduler = make_scheduler(a.prediction_type, not a.no_zero_snr)
    from diffusers import DDPMScheduler

    noise_sched = DDPMScheduler.from_config(scheduler.config)
    pred_type = scheduler.config.prediction_type
    aux_w = w.get("aux_weight", 0.0) if a.aux_weight is None else a.aux_weight
    te_warm = w.get("te_warmup", 0) if a.te_warmup is None else a.te_warmup
    aux = AuxHead(w["text_dim"]) if (aux_w or te_warm) else None
    params = list(unet.parameters()) + list(text_encoder.parameters()) + (list(aux.parameters()) if aux else [])
    n_u = sum(p.numel() for p in unet.parameters())
    n_t = sum(p.numel() for p in text_encoder.parameters())
    print(f"unet {n_u / 1e6:.3f}M params, text encoder {n_t / 1e6:.3f}M params", flush=True)
    opt = torch.optim.AdamW(params, lr=a.lr, betas=(0.9, 0.99), weight_decay=0.01)
    ema = EMA([unet, text_encoder], decay=a.ema_decay)
    step = 0
    ck = work / "ckpt.pt"
    if a.resume and ck.exists():
        st = torch.load(ck, map_location="cpu")
        unet.load_state_dict(st["unet"])
        text_encoder.load_state_dict(st["te"])
        if aux is not None and "aux" in st:
            aux.load_state_dict(st["aux"])
        opt.load_state_dict(st["opt"])
        for s, v in zip(ema.shadow, st["ema"]):
            s.copy_(v)
        step = st["step"]
        rng.setstate(st["rng"])
        torch.set_rng_state(st["torch_rng"])
        print(f"resumed at step {step}", flush=True)

    def progress(s):
        p = s / a.steps
        if a.max_minutes:
            p = max(p, (time.time() - t0) / (a.max_minutes * 60))
        return min(1.0, p)

    def lr_at(s):
        warm = 200
        if s < warm:
            return a.lr * (s + 1) / warm
        p = progress(s)
        return a.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, p))))

    def save_ckpt():
        torch.save(
            {
                "unet": unet.state_dict(),
                "te": text_encoder.state_dict(),
                "opt": opt.state_dict(),
                **({"aux": aux.state_dict()} if aux is not None else {}),
                "ema": ema.shadow,
                "step": step,
                "rng": rng.getstate(),
                "torch_rng": torch.get_rng_state(),
            },
            str(ck) + ".tmp",
        )
        Path(str(ck) + ".tmp").replace(ck)

    def do_export(path):
        ema.swap()
        try:
            export(path, unet, text_encoder, tokenizer, scheduler, tok_src=tok_dir)
        finally:
            ema.swap()

    unet.train()
    text_encoder.train()
    if te_warm and step == 0:
        # text-encoder warm-up: the attribute head on prompts alone (no rendering, no UNet), so the
        # joint run starts from conditioning that already separates shapes, colours and positions
        t_opt = torch.optim.AdamW(
            list(text_encoder.parameters()) + list(aux.parameters()), lr=a.lr, betas=(0.9, 0.99), weight_decay=0.01
        )
        tw = time.time()
        for i in range(te_warm):
            scenes = [scene_fn(rng) for _ in range(128)]
            ids, prompts = batch_prompts(rng, scenes, tokenizer, 0.1, prompt_kw)
            lab = aux_labels(scenes, prompts)
            pooled = text_encoder(ids).pooler_output
            tl = aux.loss(pooled, lab)
            t_opt.zero_grad(set_to_none=True)
            tl.backward()
            t_opt.step()
            if (i + 1) % 50 == 0:
                msg = (
                    f"te-warmup {i + 1} aux loss {tl.item():.4f} acc {aux.accuracy(pooled, lab):.3f} "
                    f"{(time.time() - tw) / 60:.1f} min"
                )
                print(msg, flush=True)
        del t_opt
        ema.shadow = [p.detach().clone() for p in ema.params]
    t0 = time.time()
    acp = noise_sched.alphas_cumprod
    losses = []
    log = open(work / "loss.log", "a")
    while step < a.steps:
        if progress(step) >= 1.0 and step < a.steps:
            print("time budget reached", flush=True)
            break
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        scenes = []
        x0, ids, prompts = batch_data(
            rng, a.batch, tokenizer, scene_fn=scene_fn, prompt_kw=prompt_kw, scenes_out=scenes
        )
        noise = torch.randn_like(x0)
        t = torch.randint(0, noise_sched.config.num_train_timesteps, (x0.shape[0],))
        xt = noise_sched.add_noise(x0, noise, t)
        te_out = text_encoder(ids)
        cond = te_out.last_hidden_state
        pred = unet(xt, t, cond).sample
        target = noise_sched.get_velocity(x0, noise, t) if pred_type == "v_prediction" else noise
        if a.min_snr and step < a.min_snr_until:
            snr = acp[t] / (1 - acp[t])
            # min-SNR-gamma (Hang et al. 2023): min(snr, g)/snr for epsilon, min(snr, g)/(snr+1) for v
            # (the v form stays finite at the zero-SNR terminal step)
            w = snr.clamp(max=a.min_snr) / (snr + 1 if pred_type == "v_prediction" else snr)
            loss = (F.mse_loss(pred, target, reduction="none").mean((1, 2, 3)) * w).mean()
        else:
            loss = F.mse_loss(pred, target)
        if aux is not None and aux_w:
            aux_loss = aux.loss(te_out.pooler_output, aux_labels(scenes, prompts))
            total = loss + aux_w * aux_loss
        else:
            total = loss
        opt.zero_grad(set_to_none=True)
        total.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        ema.update(step)
        step += 1
        losses.append(loss.item())
        if step % 50 == 0:
            m = float(np.mean(losses[-50:]))
            msg = f"step {step} loss {m:.4f} lr {lr_at(step):.2e} {(time.time() - t0) / 60:.1f} min"
            if aux is not None and aux_w:
                msg += f" aux {aux_loss.item():.3f}"
            print(msg, flush=True)
            log.write(msg + "\n")
            log.flush()
        if step % a.ckpt_every == 0:
            save_ckpt()
        if a.export_every and step % a.export_every == 0:
            do_export(work / f"export_{step}")
    save_ckpt()
    do_export(Path(a.out))
    final = float(np.mean(losses[-200:])) if losses else float("nan")
    info = {
        "world": a.world,
        "steps": step,
        "batch": a.batch,
        "lr": a.lr,
        "seed": a.seed,
        "min_snr": a.min_snr,
        "aux_weight": aux_w,
        "te_warmup": te_warm,
        "final_loss_avg200": final,
        "minutes": (time.time() - t0) / 60,
        "unet_params": n_u,
        "text_encoder_params": n_t,
    }
    (work / "train_info.json").write_text(json.dumps(info, indent=2))
    print(json.dumps(info), flush=True)


if __name__ == "__main__":
    main()
