"""``weightsmith bench merge --family flux``: merges of two full-size Flux.1 LoRAs, as a user runs them
(docs/flux_lora.md, "Merging Flux LoRAs: memory and time").

Writes once into ``--workdir`` (kept and reused; a temporary folder otherwise): a full-width Flux.1-dev
transformer in BFL layout at ``--depth`` (default the real 19 double + 38 single blocks, 11.9 B
parameters, bf16, seeded random weights, generated and written one tensor at a time) and two seeded
random rank-``--rank`` LoRAs (default 16) over every linear layer of it: ``A`` in kohya-Flux layout
(fused ``qkv``/``linear1``), ``B`` in diffusers/PEFT layout (split q/k/v). Then each method runs as the
user's command ``weightsmith merge --model … --lora A --lora B --method M --out …`` in a child process
of its own, and the floor as a child that only reads the two LoRA files (what any merger must do):
wall time and peak RSS of each child (``os.wait4``), the ratios to the floor, the output's size and
largest export error. Results go to ``results.json`` in the work folder after each method, so a run that
stops resumes where it stopped (``--fresh`` starts over).

IterIS and RegMean rows also need the text encoders: full-size random T5-XXL and CLIP-L (bf16) are written
once into ``--workdir``/``te`` and passed with ``--text-encoder``; the merge runs at the CPU's quick settings,
as ``weightsmith merge`` gives them. Their rows add the statistics passes, the transformer calls, the time
per call and the memory plan (layer groups, the budget, the planned peak). ``--plan-depth D,S`` adds a row
that only plans an IterIS merge at that depth (a child builds the solver, whose memory plan reads the stored
shapes, and exits before sampling): the planner's bound (memory in use at the start + what it keeps for the
merge + the largest layer group's statistics) and the passes a full run would make.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

CHILD = "import sys; from weightsmith.core.cli import main; sys.exit(main(sys.argv[1:]))"
FLOOR = "import sys; from weightsmith.core.lora_read import load_lora\nfor p in sys.argv[1:]:\n    load_lora(p)\n"
SAMPLED = ("iteris", "regmean")


def plan_only(model: str, text_encoders: list, loras: list) -> dict:
    """The memory plan of an IterIS merge of ``loras`` on ``model`` at the CPU's quick settings, without
    sampling (run in a child by :func:`_run`): the figures of :attr:`IterISSolver.memory`, the planned
    passes and the bound ``used at start + reserve + largest group``."""
    from ..flux_io import load_flux
    from ..lora_read import load_lora
    from ..merge.iteris import IterISSolver
    from ..merge.options import MergeOptions, with_quick
    from ..merge.sampling import make_samples

    flux = load_flux(model, text_encoders)
    ls = [load_lora(p, flux) for p in loras]
    opts = MergeOptions(**with_quick({}, True))
    names = set().union(*[set(l.modules) for l in ls])
    samples = [make_samples(["a photo"], opts.samples, opts.seed) for _ in ls]
    solver = IterISSolver(flux.sampling_model(names), ls, [1.0] * len(ls), samples, opts)
    m = dict(solver.memory)
    m["bound_bytes"] = m["used_at_start_bytes"] + m["reserve_bytes"] + m["statistics_estimate_bytes"]
    m["planned_passes"] = solver.planned_passes()
    m["modules"] = len(names)
    m["weighted_sum_modules"] = len(solver.fallback_reasons)
    return m


PLAN = (
    "import json, sys; from weightsmith.core.lab.flux_merge_bench import plan_only\n"
    "print('PLAN ' + json.dumps(plan_only(sys.argv[1], sys.argv[2:4], sys.argv[4:])))\n"
)


def _depth(text: str) -> tuple[int, int]:
    from ..errors import WeightsmithError

    try:
        d, s = (int(x) for x in str(text).split(","))
    except ValueError:
        raise WeightsmithError(f"--depth {text!r}: give double,single block counts, e.g. 19,38 (Flux.1).") from None
    if d < 1 or s < 1:
        raise WeightsmithError("--depth: at least one double and one single block.")
    return d, s


def write_transformer(folder: Path, depth: int, single: int, seed: int) -> Path:
    """A full-width random Flux.1-dev transformer (BFL names, bf16) at the given depth, written once."""
    from .flux_bench import meta_transformer, transformer_std, write_random_tensors

    path = folder / f"flux1-dev-{depth}x{single}.safetensors"
    done = folder / f"{path.stem}.done"
    if path.is_file() and done.is_file():
        return path
    write_random_tensors(meta_transformer(depth, single)[1], transformer_std, path, seed)
    done.write_text("ok")
    return path


def write_loras(folder: Path, depth: int, single: int, rank: int, seed: int) -> tuple[Path, Path]:
    """LoRA A (kohya-Flux: fused BFL names, ``.alpha`` = rank/2) and B (PEFT: split diffusers names) over
    every linear layer of the transformer, seeded; written once."""
    import torch
    from safetensors.torch import save_file

    from ..layouts.flux_names import bfl_linear_names
    from .flux_bench import meta_transformer

    a = folder / f"lora_a_kohya_r{rank}_{depth}x{single}.safetensors"
    b = folder / f"lora_b_peft_r{rank}_{depth}x{single}.safetensors"
    if a.is_file() and b.is_file():
        return a, b
    trm, bfl_shapes = meta_transformer(depth, single)
    g = torch.Generator().manual_seed(seed)

    def pair(out, inn):
        return (
            (torch.randn(out, rank, generator=g) * 0.01).to(torch.bfloat16),
            (torch.randn(rank, inn, generator=g) * inn**-0.5).to(torch.bfloat16),
        )

    ta = {}
    for n in bfl_linear_names(depth, single, guidance=True):
        up, down = pair(*bfl_shapes[n + ".weight"])
        pre = "lora_unet_" + n.replace(".", "_")
        ta[pre + ".lora_up.weight"], ta[pre + ".lora_down.weight"] = up, down
        ta[pre + ".alpha"] = torch.tensor(rank / 2.0)
    save_file(ta, str(a), {"ss_base_model_version": "flux1", "ss_network_dim": str(rank)})
    del ta
    tb = {}
    for n, m in trm.named_modules():
        if isinstance(m, torch.nn.Linear):
            up, down = pair(*m.weight.shape)
            tb[f"transformer.{n}.lora_A.weight"], tb[f"transformer.{n}.lora_B.weight"] = down, up
    save_file(tb, str(b))
    return a, b


def _child(argv: list[str], log) -> dict:
    """Run ``argv`` as a child process: wall seconds, peak RSS (GiB) and exit status."""
    t0 = time.perf_counter()
    p = subprocess.Popen(argv, stdout=log, stderr=log, env=dict(os.environ, PYTHONUNBUFFERED="1"))
    _, status, usage = os.wait4(p.pid, 0)  # this child's own rusage (peak RSS), where Popen.wait gives none
    p.returncode = os.waitstatus_to_exitcode(status)  # reaped here: Popen must not wait for it again
    return {"time_s": time.perf_counter() - t0, "peak_rss_gib": usage.ru_maxrss * 1024 / 2**30, "rc": p.returncode}


def run_flux_merge(args) -> int:
    from .flux_bench import in_workdir

    return in_workdir(args, _run, "ws-flux-merge-")


def _run(args, work: Path) -> int:
    from ..errors import WeightsmithError
    from ..merge.options import METHODS

    depth, single = _depth(args.depth)
    plan_depth = _depth(args.plan_depth) if getattr(args, "plan_depth", None) else None
    rank = args.rank or 16
    methods = [m.strip() for m in str(args.methods).split(",") if m.strip()]
    bad = [m for m in methods if m not in METHODS]
    if bad:
        raise WeightsmithError(f"--methods: {bad[0]} is not a merge method; use {', '.join(METHODS)}.")
    work.mkdir(parents=True, exist_ok=True)
    res_path = work / "results.json"
    key = f"{depth}x{single} r{rank} seed {args.seed}"  # rows of other depths are kept apart (plan rows named)
    results = json.loads(res_path.read_text()) if res_path.is_file() and not args.fresh else {}
    if results.get("key") != key:
        results = {"key": key, "rows": {}}
    log = open(work / "bench.log", "a")
    say = lambda s: print(s, file=sys.stderr, flush=True)  # noqa: E731
    t0 = time.perf_counter()
    say(f"writing the random model and LoRAs into {work} (once) ...")
    model = write_transformer(work, depth, single, args.seed)
    a, b = write_loras(work, depth, single, rank, args.seed + 1)
    results["write_s"] = results.get("write_s") or time.perf_counter() - t0
    sizes = {"model_gb": model.stat().st_size / 1e9, "lora_a_mb": a.stat().st_size / 1e6}
    sizes["lora_b_mb"] = b.stat().st_size / 1e6
    from .flux_bench import write_full_random_flux

    tes = []
    if any(m in SAMPLED for m in methods) or plan_depth:
        say("writing full-size random T5-XXL and CLIP-L (once) ...")
        _, tes = write_full_random_flux(work / "te", args.seed + 3, transformer=False)
    todo = ["floor"] + methods + ([f"plan {plan_depth[0]}x{plan_depth[1]}"] if plan_depth else [])
    for m in todo:
        if m in results["rows"]:
            continue
        say(f"running {m} ...")
        if m == "floor":
            row = _child([sys.executable, "-c", FLOOR, str(a), str(b)], log)
        elif m.startswith("plan "):
            pm = write_transformer(work, *plan_depth, args.seed)
            pa, pb = write_loras(work, *plan_depth, rank, args.seed + 1)
            out = work / "plan.out"
            with open(out, "w") as f:
                row = _child([sys.executable, "-c", PLAN, str(pm), *map(str, tes), str(pa), str(pb)], f)
            line = [x for x in out.read_text().splitlines() if x.startswith("PLAN ")]
            if row["rc"] == 0 and line:
                row["plan"] = json.loads(line[-1][5:])
        else:
            out, rep = work / f"merged_{m}.safetensors", work / f"merged_{m}.json"
            for f in (out, rep):
                f.unlink(missing_ok=True)
            argv = [sys.executable, "-c", CHILD, "merge", "--model", str(model), "--lora", str(a), "--lora", str(b),
                    "--method", m, "--out", str(out), "--report", str(rep), "--no-progress"]  # fmt: skip
            for t in tes if m in SAMPLED else ():
                argv += ["--text-encoder", str(t)]
            row = _child(argv, log)
            if row["rc"] == 0:
                r = json.loads(rep.read_text())
                if m in SAMPLED:
                    mem = r.get("memory") or {}
                    row.update(
                        passes=mem.get("passes"),
                        transformer_calls=r.get("unet_passes"),
                        text_encoder_batches=r.get("text_encoder_passes"),
                        layer_groups=mem.get("chunks"),
                        budget_gib=(mem.get("budget_bytes") or 0) / 2**30,
                        statistics_estimate_gib=(mem.get("statistics_estimate_bytes") or 0) / 2**30,
                        weighted_sum_modules=len(r.get("fallback_weighted_sum") or []),
                        options={k: r["options"].get(k) for k in ("iterations", "samples", "steps", "resolution",
                                                                  "max_rows", "max_gram_dim", "batch_size")},
                    )  # fmt: skip
                row.update(
                    out_mb=out.stat().st_size / 1e6,
                    rank=r["output"].get("rank"),
                    export_error=r["output"].get("max_error"),
                    svd_error_max=max((r.get("svd_errors") or {0: 0.0}).values()),
                )
                out.unlink()  # the merged file is the same size as the inputs: not kept
        if row["rc"] != 0:
            raise WeightsmithError(f"bench merge --family flux: {m} failed (exit {row['rc']}); see {work}/bench.log")
        results["rows"][m] = row
        res_path.write_text(json.dumps(results, indent=1))
    floor = results["rows"]["floor"]
    result = {
        "model": f"random Flux.1-dev transformer, full width, {depth} double + {single} single blocks, bf16",
        "loras": f"2 random rank-{rank} LoRAs over every linear layer (A kohya-Flux, B diffusers/PEFT)",
        **sizes,
        "rows": results["rows"],
        "machine_threads": os.cpu_count(),
    }
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(f"Flux LoRA merge benchmark: {result['model']} ({sizes['model_gb']:.1f} GB)")
    print(f"  {result['loras']} ({sizes['lora_a_mb']:.0f} + {sizes['lora_b_mb']:.0f} MB)")
    head = f"{'method':<8}{'time s':>9}{'× floor':>9}{'peak GiB':>10}{'× floor':>9}{'out MB':>9}{'rank':>6}"
    print(head + f"{'export err':>12}{'svd err':>10}")
    for m, r in results["rows"].items():
        if m.startswith("plan "):
            continue
        print(
            f"{m:<8}{r['time_s']:>9.1f}{r['time_s'] / floor['time_s']:>9.1f}{r['peak_rss_gib']:>10.2f}"
            f"{r['peak_rss_gib'] / floor['peak_rss_gib']:>9.2f}{r.get('out_mb', 0):>9.0f}"
            f"{str(r.get('rank', '-')):>6}{(r.get('export_error') or 0):>12.1e}{(r.get('svd_error_max') or 0):>10.2e}"
        )
    print("floor: a child that only reads the two LoRA files; each row: `weightsmith merge` in a child of its own;")
    print("svd err: the largest relative truncation error of a module (rank --rank of the Σ r_i-rank sum)")
    for m, r in results["rows"].items():
        if m in SAMPLED:
            o = r.get("options") or {}
            print(
                f"{m}: {r['passes']} statistics passes in {r['layer_groups']} layer group(s), {r['transformer_calls']} "
                f"transformer calls ({r['time_s'] / max(1, r['transformer_calls']):.1f} s each, batch "
                f"{o.get('batch_size')} at {o.get('resolution')} px), {r['text_encoder_batches']} text batches; budget "
                f"{r['budget_gib']:.1f} GiB, statistics of the largest group {r['statistics_estimate_gib']:.2f} GiB; "
                f"{r['weighted_sum_modules']} modules wider than max_gram_dim {o.get('max_gram_dim')} "
                "take the weighted sum"
            )
        elif m.startswith("plan ") and r.get("plan"):
            p = {k: v / 2**30 if k.endswith("_bytes") and v else v for k, v in r["plan"].items()}
            print(
                f"{m} (IterIS plan only, quick settings): bound {p['bound_bytes']:.2f} GiB = in use at start "
                f"{p['used_at_start_bytes']:.2f} + kept for the merge {p['reserve_bytes']:.2f} + largest "
                f"group {p['statistics_estimate_bytes']:.2f}; budget {p['budget_bytes'] or 0:.1f} GiB; "
                f"{p['chunks']} layer group(s), {p['planned_passes']} passes; {p['modules']} modules, "
                f"{p['weighted_sum_modules']} take the weighted sum; child peak RSS {r['peak_rss_gib']:.2f} GiB"
            )
    return 0
