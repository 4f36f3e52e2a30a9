"""IterIS under a memory budget (docs/merge.md, "Memory"): layers planned into groups that get their
own passes give the very same merge as one pass over everything; what does not fit falls back to
the weighted sum with the reason in the report; an impossible budget is a clear error."""

import sys
from pathlib import Path

import pytest
import torch

from weightsmith.core.errors import WeightsmithError
from weightsmith.core.lab.random_loras import random_lora
from weightsmith.core.lora_read import lora_from_state_dict
from weightsmith.core.merge import MergeOptions, merge
from weightsmith.core.merge.iteris import IterISSolver
from weightsmith.core.merge.stats import input_group as _input_group

sys.path.insert(0, str(Path(__file__).parent))
import ws_timeouts as T  # noqa: E402

PROMPTS = [["a red cat on a tree", "a dog at night"], ["a blue car in the city", "portrait of an old man"]]
OPTS = dict(iterations=2, tol=0.0, samples=2, steps=1, latent_size=8, batch_size=2)


def _loras(model):
    out = []
    for s, groups in ((1, ("te", "attn", "ff")), (2, ("te", "attn", "conv"))):
        t, meta = random_lora(model, groups=groups, rank=2, seed=s, strength=0.3)
        out.append(lora_from_state_dict(t, model, metadata=meta, name=f"l{s}"))
    return out


def _limit(monkeypatch, avail):
    """Leave exactly ``avail`` bytes for statistics, whatever this process already holds."""

    def budget(self, reserve):
        return 10**12, 0, avail(self) if callable(avail) else avail

    monkeypatch.setattr(IterISSolver, "_statistics_budget", budget)


def _group_sizes(model, loras):
    """The planner's estimate per input group (one group per chunk when the budget is the largest)."""
    solver = IterISSolver(model, loras, [1.0, 1.0], [[], []], MergeOptions(**OPTS))
    return solver


def test_layer_groups_over_several_passes_give_the_same_merge(tiny_models, monkeypatch):
    model = tiny_models["sd1"]
    loras = _loras(model)
    whole = merge(model, loras, "iteris", prompts=PROMPTS, options=MergeOptions(**OPTS))
    assert whole.report["memory"]["chunks"] == 1

    sizes = _group_sizes(model, loras).group_bytes
    _limit(monkeypatch, max(sizes.values()))  # room for the largest input group, not for all
    assert sum(sizes.values()) > 4 * max(sizes.values())
    calls = []
    split = merge(
        model,
        loras,
        "iteris",
        prompts=PROMPTS,
        options=MergeOptions(**OPTS),
        progress=lambda d, t, label: calls.append((d, t, label)),
    )
    mem = split.report["memory"]
    assert mem["chunks"] >= 5 and mem["unet_chunks"] >= 1 and mem["unet_chunks"] < mem["chunks"]
    # every chunk of every round runs each LoRA once: 1 + iterations + final objective rounds
    assert mem["passes"] == mem["chunks"] * 2 * (1 + OPTS["iterations"] + 1)
    # one progress tick per text batch and per UNet step: 2 prompts in one batch of 2, 2 samples × 1 step
    rounds, k = 1 + OPTS["iterations"] + 1, 2
    ticks = rounds * k * (mem["chunks"] + mem["unet_chunks"])
    assert calls[-1][0] == calls[-1][1] == ticks == len(calls) - 1  # + the start (0, total) call
    assert [d for d, _, _ in calls] == list(range(ticks + 1))
    assert any("layer group" in label for _, _, label in calls)
    assert sum("left" in label for _, _, label in calls) >= ticks - 1  # time left on every tick but the last
    assert split.report["fallback_weighted_sum"] == whole.report["fallback_weighted_sum"] == []
    assert sorted(split.deltas) == sorted(whole.deltas)
    for n in whole.deltas:
        assert torch.equal(split.deltas[n], whole.deltas[n]), n
    for a, b in zip(split.report["curve"], whole.report["curve"], strict=True):  # sums in another order
        for key in ("objective", "change"):  # None: not measured in that round
            assert (a[key] is None) == (b[key] is None), key
            if a[key] is not None:
                assert a[key] == pytest.approx(b[key], rel=1e-12), key
    assert mem["peak_rss_bytes"] > 0


def test_a_layer_over_the_budget_falls_back_with_its_reason(tiny_models, monkeypatch):
    model = tiny_models["sd1"]
    loras = _loras(model)
    sizes = _group_sizes(model, loras).group_bytes
    top = max(sizes.values())
    _limit(monkeypatch, max(v for v in sizes.values() if v < top))  # room for all but the largest
    wide = sorted(n for n in set(loras[0].modules) | set(loras[1].modules) if sizes.get(_input_group(n)) == top)
    assert wide
    edit = merge(model, loras, "iteris", prompts=PROMPTS, options=MergeOptions(**OPTS))
    assert edit.report["fallback_weighted_sum"] == wide
    for n in wide:
        assert "memory budget" in edit.report["fallback_reasons"][n]
        want = sum(l.modules[n].delta() for l in loras if n in l.modules)
        assert float((edit.deltas[n] - want).norm() / want.norm()) <= 1e-5
    others = [n for n in edit.deltas if n not in wide]
    lin = {n: sum(l.modules[n].delta() for l in loras if n in l.modules) for n in others}
    assert max(float((edit.deltas[n] - lin[n]).norm() / lin[n].norm()) for n in others) > 1e-3


def test_a_budget_below_the_model_is_a_clear_error(tiny_models):
    model = tiny_models["sd1"]
    with pytest.raises(WeightsmithError, match="--max-memory"):
        merge(model, _loras(model), "iteris", prompts=PROMPTS, options=MergeOptions(max_memory_gb=0.01, **OPTS))
    with pytest.raises(WeightsmithError, match="max_memory_gb"):
        MergeOptions(max_memory_gb=-1.0).validate()


def test_release_free_heap_hands_freed_heap_blocks_back():
    """Freed blocks below glibc's mmap threshold stay in the heap, counted in RSS, until trimmed: the
    case of IterIS's freed statistics (docs/merge.md, "Memory"). Independent measure: /proc RSS. Run in
    a fresh interpreter: after the rest of the suite the heap's layout (where freed blocks land) is not
    under the test's control."""
    import ctypes
    import json
    import platform
    import sys

    try:
        _ = ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        pytest.skip("not glibc: release_free_heap is a no-op here")
    if platform.system() != "Linux":
        pytest.skip("RSS is read from /proc")
    code = """
import json, torch
from weightsmith.core import memory
big = torch.empty(4 * 2**20 // 4 + 1).fill_(1.0)
del big                                    # freeing an mmapped block raises glibc's threshold above 2 MB
blocks, keep = [], []
for _ in range(120):      # 120 x 2 MB, each pinned in place by a 160 kB block after it (too large to
    blocks.append(torch.empty(2**19).fill_(1.0))      # come from glibc's small-block free lists)
    keep.append(torch.empty(40000).fill_(1.0))
memory.release_free_heap()
before = memory.rss()
del blocks
held = memory.rss()
memory.release_free_heap(collect=False)
print(json.dumps([before, held, memory.rss()]))
"""
    out = T.run(
        [sys.executable, "-c", code],
        what="the IterIS memory child",
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    before, held, after = json.loads(out.stdout.strip().splitlines()[-1])
    assert held - before > -50 * 2**20, "the freed blocks left the heap without a trim (nothing to show)"
    assert held - after > 150 * 2**20, (before, held, after)


def test_default_budget_full_by_the_process_itself_falls_back_to_what_is_free(tiny_models, monkeypatch):
    """A web UI that already holds most of the default share (its model loaded) gets what the machine
    has free rather than a refusal; a budget the user gave is never raised; the report says so."""
    from weightsmith.core import memory

    model = tiny_models["sd1"]
    loras = _loras(model)
    used = 10 * memory.GIB
    monkeypatch.setattr(memory, "used_bytes", lambda device="cpu": used)
    monkeypatch.setattr(memory, "default_budget", lambda device="cpu": used + 2**20)  # 1 MB left
    monkeypatch.setattr(memory, "free_budget", lambda device="cpu": used + 4 * memory.GIB)
    solver = IterISSolver(model, loras, [1.0, 1.0], [[], []], MergeOptions(**OPTS))
    assert solver.memory["budget_bytes"] == used + 4 * memory.GIB
    assert "raised to what is free: 14.0 GB" in solver.memory["budget_rule"]
    assert len(solver.plan) == 1 and not solver.fallback_reasons
    edit = merge(model, loras, "iteris", prompts=PROMPTS, options=MergeOptions(**OPTS))
    assert "budget_rule" in edit.report["memory"]
    # nothing free either: still the clear error, its sizes readable (MB, not "0.0 GB")
    monkeypatch.setattr(memory, "free_budget", lambda device="cpu": used + 2**20)
    with pytest.raises(WeightsmithError, match=r"need \d+ MB|need \d+\.\d GB"):
        IterISSolver(model, loras, [1.0, 1.0], [[], []], MergeOptions(**OPTS))
    # a budget given by the user is kept as given
    with pytest.raises(WeightsmithError, match="--max-memory"):
        IterISSolver(model, loras, [1.0, 1.0], [[], []], MergeOptions(max_memory_gb=10.001, **OPTS))
