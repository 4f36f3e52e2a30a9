"""``weightsmith bench merge``: streaming IterIS beside a reference-style implementation that stores
every feature (as the public IterIS code does), on an SD1.5-architecture model with random weights.

Two seeded random rank-8 LoRAs touch UNet attention (to_q/k/v/out), feed-forward (ff.net.0.proj,
ff.net.2) and every text-encoder layer (q/k/v/out_proj, fc1, fc2). Both implementations run the same
sampling protocol (docs/method.md, "IterIS sampling protocol") and the same math, so their merges
must agree (printed as a check); they differ in what they keep:

- ``iteris`` (ours): Gram matrices accumulated through hooks; each iteration re-runs "base + LoRA i"
  beside the merged model to pair ``X_i`` with ``X̃_i`` (two forward passes per sample and step);
- ``reference``: stores ``X_i`` once (float32, one copy per hooked module, as the public code) and
  ``X̃_i`` every iteration, then forms the Grams; one forward pass per sample and step per iteration
  (:func:`weightsmith.core.lab.reference.reference_iteris`).

Printed per sample count: time and peak RSS of both, as ratios, the time of the forward passes ours
needs (measured per pass, × the passes it ran) and ours / that; then the objective ``J`` of iteris and of
linear merging on held-out samples (other prompts, other seeds). Peak memory is the process's RSS
above the level at entry (PyTorch CPU allocations do not show in tracemalloc). Defaults are sized
for a few minutes on 2 CPU cores: 8×8 latents, one timestep per sample, one iteration; inputs wider
than ``--max-gram-dim`` (default 2560: the text encoder's fc2, 3072 wide, and ff.net.2 of the
1280-channel blocks, 5120 wide) use the documented weighted-sum fallback so the float64 state and
solves stay small (raise it to include them). At SD's real 64×64 latents the reference's
UNet features grow 64-fold per sample and step; the estimate is printed too.
"""

from __future__ import annotations

import json
import sys
import time

from ..memory import release_free_heap

PROMPTS = [
    ["a photo of a red cat", "a red cat on a tree", "a small red cat in a garden", "portrait of a red cat"],
    [
        "a city street at night, van gogh style",
        "a river in van gogh style",
        "a church by van gogh",
        "a bright sky over the sea, van gogh",
    ],
]
HELD_OUT = [["a red cat and a dog", "a red cat by the river"], ["a mountain in van gogh style", "a house, van gogh"]]


def add_arguments(p) -> None:
    p.add_argument(
        "--size",
        choices=("full", "tiny"),
        default="full",
        help="full: SD1.5 architecture (default); tiny: a quick smoke run",
    )
    p.add_argument("--samples", default="8,32", help="sample counts per LoRA to compare (default 8,32)")
    p.add_argument("--latent-size", type=int, default=8, help="latent side (default 8 = 64 px)")
    p.add_argument("--steps", type=int, default=1, help="timesteps per sample (default 1)")
    p.add_argument("--iterations", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--heldout", type=int, default=4, help="held-out samples per LoRA for the objective")
    p.add_argument("--rank", type=int, default=None, help="LoRA rank (default 8; flux: 16)")
    p.add_argument(
        "--max-gram-dim",
        type=int,
        default=2560,
        help="wider inputs use the weighted sum (default 2560: the text encoder's fc2 and the "
        "1280-channel ff.net.2 fall back, keeping the float64 state and solves small)",
    )
    p.add_argument("--alpha", type=float, default=None, help="ridge α₁ = α₂ (default: MergeOptions' 1e-2)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--family",
        choices=("sd1", "sdxl", "flux"),
        default=None,
        help="memory mode: IterIS on the full SD1.5 or SDXL architecture (random, seeded) with LoRAs "
        "on every transformer linear layer and both text encoders, default merge settings but "
        "--samples/--steps/--iterations/--latent-size sized for a CPU; prints peak RSS (model "
        "included), time, passes and layer groups. flux: the data-free merges of two full-size Flux "
        "LoRAs as `weightsmith merge` runs them (core/lab/flux_merge_bench.py)",
    )
    p.add_argument("--workdir", default=None, help="flux: folder for the random model and LoRAs (kept, reused)")
    p.add_argument("--depth", default="19,38", help="flux: double,single blocks (default 19,38: Flux.1)")
    p.add_argument("--methods", default="linear,concat,svd", help="flux: merge methods to run (iteris and regmean too)")
    p.add_argument(
        "--plan-depth", default=None, metavar="D,S", help="flux: also plan (not run) an IterIS merge at this depth"
    )
    p.add_argument("--fresh", action="store_true", help="flux: ignore the results saved in --workdir")
    p.add_argument("--loras", type=int, default=3, help="memory mode: number of LoRAs (default 3)")
    p.add_argument(
        "--weights",
        choices=("bf16", "fp16", "fp32"),
        default="bf16",
        help="memory mode: dtype the model's weights are held in (computed in float32)",
    )
    p.add_argument(
        "--max-memory",
        type=float,
        default=0.0,
        metavar="GB",
        help="memory mode: the merge's budget (default 0 = automatic, as a user gets it)",
    )
    p.add_argument(
        "--compare",
        action="store_true",
        help="memory mode: also run today's one-pass path (no budget) and check both merges agree",
    )


def _every_minute(label: str):
    """A ``progress`` callable printing one line to stderr at most once a minute (long unattended runs)."""
    last = [0.0]

    def progress(done: int, total: int, text: str) -> None:
        now = time.monotonic()
        if now - last[0] >= 60 or done == total:
            last[0] = now
            print(f"  {label}: {done}/{total} {text}", file=sys.stderr, flush=True)

    return progress


def run_memory(args) -> int:
    """``--family``: IterIS at full size under the memory budget (docs/merge.md, "Memory")."""
    import torch

    from .. import memory
    from ..lora_read import lora_from_state_dict
    from ..merge import MergeOptions, merge
    from .random_loras import random_lora
    from .random_models import build_random_model

    dt = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}[args.weights]
    samples = int(str(args.samples).split(",")[0]) if args.samples != "8,32" else 4
    watch = memory.PeakRSS(interval=0.02).__enter__()
    t0 = time.perf_counter()
    model = build_random_model(args.family, "full", seed=args.seed, weights_dtype=dt)
    _ = model.unet
    t_model = time.perf_counter() - t0
    rss_model = memory.rss()
    groups = ("attn", "ff", "proj", "te")
    loras = [
        lora_from_state_dict(
            random_lora(model, groups=groups, rank=args.rank or 8, seed=args.seed + 1 + i, strength=0.2)[0],
            model,
            name=f"lora{i + 1}",
        )
        for i in range(args.loras)
    ]
    release_free_heap()
    rss_inputs = memory.rss()
    prompts = [[p + f" {i}" for p in PROMPTS[i % 2]] for i in range(args.loras)]
    base = dict(
        iterations=args.iterations,
        tol=0.0,
        steps=args.steps,
        latent_size=args.latent_size,
        batch_size=args.batch_size,
        seed=args.seed,
        samples=samples,
        evaluate_final=False,
    )
    if args.alpha is not None:
        base.update(alpha1=args.alpha, alpha2=args.alpha)
    n_mod = len(set().union(*[set(l.modules) for l in loras]))
    settings = {
        "model": f"{args.family} full architecture, random, seed {args.seed}, weights {args.weights}",
        "threads": torch.get_num_threads(),
        "loras": f"{args.loras} random, rank {args.rank or 8}, {'+'.join(groups)} ({n_mod} modules)",
        "samples": samples,
        "steps": args.steps,
        "latent": args.latent_size,
        "iterations": args.iterations,
        "batch_size": args.batch_size,
        "max_gram_dim": MergeOptions.max_gram_dim,
        "max_memory_gb": args.max_memory or "auto",
    }
    if not args.json:
        print("merge memory benchmark: " + ", ".join(f"{k}={v}" for k, v in settings.items()), flush=True)
        print(
            f"model built in {t_model:.0f}s: RSS {memory.gib(rss_model)}; with the LoRAs {memory.gib(rss_inputs)}",
            flush=True,
        )
    runs = []
    plans = [("budget", args.max_memory)] + ([("one pass (today's path)", 1e6)] if args.compare else [])
    edits = []
    for label, gb in plans:
        release_free_heap()
        with memory.PeakRSS() as m:
            edit = merge(
                model,
                loras,
                "iteris",
                prompts=prompts,
                options=MergeOptions(max_memory_gb=gb, **base),
                progress=None if args.json else _every_minute(label),
            )
        edits.append(edit)
        mem = edit.report["memory"]
        row = {
            "run": label,
            "time_s": m.seconds,
            "peak_rss_bytes": m.peak,
            "budget_bytes": mem["budget_bytes"],
            "layer_groups": mem["chunks"],
            "unet_groups": mem["unet_chunks"],
            "passes": mem["passes"],
            "unet_passes": edit.report["unet_passes"],
            "weighted_sum": len(edit.report["fallback_weighted_sum"]),
            "weighted_sum_reasons": sorted(set(edit.report["fallback_reasons"].values())),
        }
        runs.append(row)
        if not args.json:
            print(
                f"{label}: {m.seconds:.0f}s, peak RSS {memory.gib(m.peak)} (model included; budget "
                f"{memory.gib(mem['budget_bytes'])}), {mem['chunks']} layer groups ({mem['unet_chunks']} with "
                f"UNet passes), {mem['passes']} passes, {edit.report['unet_passes']} UNet forward passes, "
                f"{row['weighted_sum']} modules on the weighted sum"
                + (f" ({'; '.join(row['weighted_sum_reasons'])})" if row["weighted_sum"] else ""),
                flush=True,
            )
    watch.__exit__(None, None, None)
    result = {
        "settings": settings,
        "model_rss_bytes": rss_model,
        "inputs_rss_bytes": rss_inputs,
        "process_peak_rss_bytes": watch.peak,
        "runs": runs,
    }
    if len(edits) == 2:
        a, b = edits
        result["max_rel_diff"] = max(
            float((a.deltas[n] - b.deltas[n]).norm() / b.deltas[n].norm().clamp_min(1e-30)) for n in b.deltas
        )
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(
            f"process peak RSS {memory.gib(watch.peak)} (model, LoRAs and merge)"
            + (f"; budget and one-pass merges agree to {result['max_rel_diff']:.1e}" if len(edits) == 2 else "")
        )
    return 0


def run(args) -> int:
    import torch

    from ..lora_read import lora_from_state_dict
    from ..memory import PeakRSS
    from ..merge import MergeOptions, merge
    from ..merge.baselines import concat
    from ..merge.iteris import IterISSolver
    from ..merge.sampling import make_samples
    from .random_loras import random_lora
    from .random_models import build_random_model
    from .reference import reference_iteris

    if args.family == "flux":
        from .flux_merge_bench import run_flux_merge

        return run_flux_merge(args)
    if args.family:
        return run_memory(args)
    counts = [int(c) for c in str(args.samples).split(",") if c.strip()]
    model = build_random_model("sd1", args.size, seed=args.seed)
    _ = model.unet
    groups = ("attn", "ff", "te")
    loras = [
        lora_from_state_dict(
            random_lora(model, groups=groups, rank=args.rank or 8, seed=args.seed + 1 + i, strength=0.2)[0],
            model,
            name=f"lora{i + 1}",
        )
        for i in range(2)
    ]
    base = dict(
        iterations=args.iterations,
        tol=0.0,
        steps=args.steps,
        latent_size=args.latent_size,
        batch_size=args.batch_size,
        seed=args.seed,
        max_gram_dim=args.max_gram_dim,
        evaluate_final=False,
    )
    if args.alpha is not None:
        base.update(alpha1=args.alpha, alpha2=args.alpha)
    settings = {
        "model": f"sd1 random, size={args.size}, seed={args.seed}",
        "threads": torch.get_num_threads(),
        "loras": f"2 random, rank {args.rank or 8}, targets {'+'.join(groups)} ({len(loras[0].modules)} modules each)",
        "latent": f"{args.latent_size}x{args.latent_size}",
        "timesteps_per_sample": args.steps,
        "iterations": args.iterations,
        "batch_size": args.batch_size,
        "max_gram_dim": args.max_gram_dim,
        "samples": counts,
        "heldout_samples": args.heldout,
        "alpha": base.get("alpha1", MergeOptions.alpha1),
    }
    if not args.json:
        print("merge benchmark settings: " + ", ".join(f"{k}={v}" for k, v in settings.items()), flush=True)

    # time of one forward pass of each kind, with a LoRA's hooks on (what the passes cost without stats)
    from ..merge.iteris import lora_factors
    from ..merge.stats import DeltaHooks

    hooks = DeltaHooks(model, sorted(loras[0].modules))
    hooks.add("l", lora_factors(loras[0]))
    hooks.use("l")
    B = args.batch_size
    with torch.no_grad():
        cond = model.encode(PROMPTS[0][:1] * B)
        z = torch.randn(B, 4, args.latent_size, args.latent_size)
        model.unet(z, 999, encoder_hidden_states=cond.context)
        t0 = time.perf_counter()
        for _ in range(2):
            model.unet(z, 999, encoder_hidden_states=cond.context)
        t_unet = (time.perf_counter() - t0) / 2
        t0 = time.perf_counter()
        for _ in range(2):  # ours encodes each distinct prompt once per phase (4 per LoRA here)
            model.encode(PROMPTS[0][: min(B, len(PROMPTS[0]))])
        t_te = (time.perf_counter() - t0) / 2
    hooks.remove()

    rows = []
    ours_edit = None
    for n in counts:
        opts = MergeOptions(samples=n, **base)
        release_free_heap()
        with PeakRSS() as m_ours:
            edit = merge(model, loras, "iteris", prompts=PROMPTS, options=opts)
        ours_edit = edit
        r = edit.report
        forward_s = r["unet_passes"] * t_unet + r["text_encoder_passes"] * t_te
        samples = [make_samples(p, n, args.seed) for p in PROMPTS]
        release_free_heap()
        with PeakRSS() as m_ref:
            ref_fac, ref_bytes = reference_iteris(model, loras, samples, opts)
        diff = max(
            float(((U @ V).reshape(edit.deltas[k].shape).float() - edit.deltas[k]).norm() / edit.deltas[k].norm())
            for k, (U, V) in ref_fac.items()
        )
        rows.append(
            {
                "samples": n,
                "iteris_time_s": m_ours.seconds,
                "reference_time_s": m_ref.seconds,
                "time_ratio": m_ours.seconds / m_ref.seconds,
                "iteris_peak_mib": m_ours.mib,
                "reference_peak_mib": m_ref.mib,
                "mem_ratio": m_ours.mib / m_ref.mib if m_ref.mib > 0 else float("nan"),
                "forward_passes_s": forward_s,
                "time_vs_forward": m_ours.seconds / forward_s,
                "unet_passes": r["unet_passes"],
                "text_encoder_passes": r["text_encoder_passes"],
                "reference_feature_mib": {k: v / 2**20 for k, v in ref_bytes.items()},
                "max_rel_diff_vs_reference": diff,
                "weighted_sum_fallback_modules": len(r["fallback_weighted_sum"]),
            }
        )
        if not args.json:
            x = rows[-1]
            print(
                f"samples={n:>3}: iteris {x['iteris_time_s']:.1f}s {x['iteris_peak_mib']:.0f} MiB | reference "
                f"{x['reference_time_s']:.1f}s {x['reference_peak_mib']:.0f} MiB | ratios time "
                f"{x['time_ratio']:.2f}x mem {x['mem_ratio']:.2f}x | forward passes {forward_s:.1f}s -> "
                f"iteris/forward {x['time_vs_forward']:.2f}x | merges agree to {diff:.1e}",
                flush=True,
            )

    held = [make_samples(p, args.heldout, args.seed + 1000) for p in HELD_OUT]
    ev = IterISSolver(model, loras, [1.0, 1.0], held, MergeOptions(samples=args.heldout, **base))
    j_iteris, _ = ev.evaluate(ours_edit.factors)
    lin = concat(model, loras, [1.0, 1.0])
    j_linear, _ = ev.evaluate(lin.factors)
    ur = rows[-1]["reference_feature_mib"]["unet"] / max(rows[-1]["samples"], 1) / max(args.steps, 1)
    est = ur * (64 / args.latent_size) ** 2 * 3
    result = {
        "settings": settings,
        "rows": rows,
        "heldout": {
            "iteris_objective": j_iteris,
            "linear_objective": j_linear,
            "iteris_vs_linear": j_iteris / j_linear if j_linear else float("nan"),
        },
        "reference_unet_feature_mib_per_sample_at_64x64_3_steps": est,
        "goals": {"peak_memory": "flat in the number of samples", "time_vs_forward_passes_max": 1.3},
    }
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        flat = rows[-1]["iteris_peak_mib"] / max(rows[0]["iteris_peak_mib"], 1e-9) if len(rows) > 1 else 1.0
        print(
            f"held-out objective (lower is better): iteris {j_iteris:.4g}, linear {j_linear:.4g} "
            f"-> iteris/linear {result['heldout']['iteris_vs_linear']:.3f}"
        )
        print(
            f"peak memory growth {counts[0]} -> {counts[-1]} samples: iteris x{flat:.2f}, reference x"
            f"{rows[-1]['reference_peak_mib'] / max(rows[0]['reference_peak_mib'], 1e-9):.2f}"
        )
        print(f"reference UNet features per sample at 64x64 latents, 3 steps: ~{est:.0f} MiB (ours: none stored)")
        print("goals: peak memory flat in samples; iteris time <= 1.3x its forward passes")
    return 0
