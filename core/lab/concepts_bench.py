"""``weightsmith bench erase --concepts N``: many concepts erased in one run (docs/reliability.md,
"Many concepts"). Prints time and peak resident memory above the loaded model for uce and erasepro
on a random model of the SD1.5 architecture (``--size tiny``: a quick smoke run), for N and N/2
concepts, so the growth with N can be read off (the solvers never form an N × N matrix)."""

from __future__ import annotations

import itertools
import sys


def concept_names(n: int) -> list[str]:
    """``n`` distinct two-word concepts built from the word tokenizer's list (deterministic)."""
    from ..tokenizer import DEFAULT_WORDS

    words = [w for w in DEFAULT_WORDS if len(w) > 2]
    pairs = itertools.permutations(words, 2)
    names = [f"{a} {b}" for a, b in itertools.islice(pairs, n)]
    if len(names) < n:
        from ..errors import WeightsmithError

        raise WeightsmithError(f"--concepts {n}: at most {len(names)} distinct concepts can be built here.")
    return names


def run_concepts(args) -> int:
    import torch

    from ..erase import EraseOptions, erase
    from ..memory import PeakRSS
    from ..progress import tqdm_progress
    from .random_models import build_random_model

    n = int(args.concepts)
    torch.manual_seed(args.seed)
    model = build_random_model("sd1", args.size, seed=args.seed)
    _ = model.unet
    print(
        f"erasing many concepts at once: {args.size} SD1.5-architecture random model, "
        f"{torch.get_num_threads()} threads; time and peak RSS above the loaded model"
    )
    print(f"{'method':<10}{'concepts':>9}{'features':>10}{'time s':>9}{'peak MiB':>10}")
    for method in ("uce", "erasepro"):
        for k in sorted({max(1, n // 2), n}):
            opts = EraseOptions(expand_prompts=False)
            bar = tqdm_progress(f"{method}, {k} concepts") if sys.stderr.isatty() else None
            try:
                with PeakRSS() as m:
                    edit = erase(model, concept_names(k), ["art"], method=method, options=opts, progress=bar)
            finally:
                if bar is not None:
                    bar.close()
            feats = max(r["features"] for r in edit.report["stages"])
            print(f"{method:<10}{k:>9}{feats:>10}{m.seconds:>9.2f}{m.mib:>10.1f}")
            del edit
    return 0
