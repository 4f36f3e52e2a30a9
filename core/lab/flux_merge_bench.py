"""``weightsmith bench merge --family flux``: the data-free merges of two full-size Flux.1 LoRAs, as a user
runs them (docs/flux_lora.md, "Merging Flux LoRAs: memory and time").

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
    from ..merge.options import DATA_FREE

    depth, single = _depth(args.depth)
    rank = args.rank or 16
    methods = [m.strip() for m in str(args.methods).split(",") if m.strip()]
    bad = [m for m in methods if m not in DATA_FREE]
    if bad:
        raise WeightsmithError(f"--methods: {bad[0]} is not a data-free merge; use {', '.join(DATA_FREE)}.")
    work.mkdir(parents=True, exist_ok=True)
    res_path = work / "results.json"
    key = f"{depth}x{single} r{rank} seed {args.seed}"
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
    todo = ["floor"] + methods
    for m in todo:
        if m in results["rows"]:
            continue
        say(f"running {m} ...")
        if m == "floor":
            row = _child([sys.executable, "-c", FLOOR, str(a), str(b)], log)
        else:
            out, rep = work / f"merged_{m}.safetensors", work / f"merged_{m}.json"
            for f in (out, rep):
                f.unlink(missing_ok=True)
            argv = [sys.executable, "-c", CHILD, "merge", "--model", str(model), "--lora", str(a), "--lora", str(b),
                    "--method", m, "--out", str(out), "--report", str(rep), "--no-progress"]  # fmt: skip
            row = _child(argv, log)
            if row["rc"] == 0:
                r = json.loads(rep.read_text())
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
        print(
            f"{m:<8}{r['time_s']:>9.1f}{r['time_s'] / floor['time_s']:>9.1f}{r['peak_rss_gib']:>10.2f}"
            f"{r['peak_rss_gib'] / floor['peak_rss_gib']:>9.2f}{r.get('out_mb', 0):>9.0f}"
            f"{str(r.get('rank', '-')):>6}{(r.get('export_error') or 0):>12.1e}{(r.get('svd_error_max') or 0):>10.2e}"
        )
    print("floor: a child that only reads the two LoRA files; each row: `weightsmith merge` in a child of its own;")
    print("svd err: the largest relative truncation error of a module (rank --rank of the Σ r_i-rank sum)")
    return 0
