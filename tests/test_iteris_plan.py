"""IterIS's memory plan as a plain function (core/merge/memory_plan.py; docs/merge.md, "Memory"):
its sizes and chunks for small made-up modules and budgets, computed by hand below; and the
progress costs of a run held once per kind of round, whatever the iteration count."""

import pytest

from weightsmith.core.errors import WeightsmithError
from weightsmith.core.merge.memory_plan import (
    Budget,
    ModuleSize,
    PlanSettings,
    group_bytes,
    level_rows,
    plan_memory,
    reserve_bytes,
)

A = "text_encoder.text_model.encoder.layers.0.self_attn.k_proj"  # A and B read the same input (one group)
B = "text_encoder.text_model.encoder.layers.0.self_attn.v_proj"
C = "unet.down_blocks.0.attentions.0.proj_in"  # level 0: 8×8 pixels per item
D = "unet.up_blocks.1.resnets.0.conv1"  # 20 wide > max_gram_dim 10
E = "unet.mid_block.attentions.0.proj_out"  # level 1: 4×4 pixels per item
QKV = "text_encoder.text_model.encoder.layers.0.self_attn.qkv"
MODULES = [
    ModuleSize(A, 4, 4, 4, (2,)),
    ModuleSize(B, 4, 4, 4, (2, 1)),
    ModuleSize(C, 6, 6, 6, (1,)),
    ModuleSize(D, 20, 2, 20, (1,)),
    ModuleSize(E, 5, 5, 5, (3,)),
]
S = PlanSettings(batch=2, latent=8, levels=2, tokens=3, max_gram_dim=10)

# by hand: 8d² (H) + members·8d² (denominators) + 2·Σ 8·r·d (D) + rows·d·4 (queued rows)
SIZES = {
    QKV: 8 * 16 + 2 * 8 * 16 + 2 * 8 * (2 + 2 + 1) * 4 + (2 * 3) * 4 * 4,  # 128 + 256 + 320 + 96
    C: 8 * 36 + 8 * 36 + 2 * 8 * 1 * 6 + (2 * 64) * 6 * 4,  # 288 + 288 + 96 + 3072
    E: 8 * 25 + 8 * 25 + 2 * 8 * 3 * 5 + (2 * 16) * 5 * 4,
}  # 200 + 200 + 240 + 640


def test_sizes_by_hand():
    assert SIZES == {QKV: 800, C: 3744, E: 1280}
    by = {m.name: m for m in MODULES}
    assert {g: group_bytes(ms, by, S) for g, ms in ((QKV, [A, B]), (C, [C]), (E, [E]))} == SIZES
    s2 = PlanSettings(batch=2, latent=8, levels=2, tokens=3, max_gram_dim=10, c_norm=True)  # + 4d² (C float32)
    assert group_bytes([A, B], by, s2) == 800 + 4 * 16
    assert [level_rows(n, 2, 2, 8, 3) for n in (A, C, D, E)] == [6, 128, 128, 32]
    assert level_rows(C, 2, 2, 8, 3, cap=10) == 20
    # merge 2·Σ r·row·4, hooks 2·Σ 4·r·(out+in), solve 16·6², rows 4·8·(128·6), 256 MB (D's width not counted)
    merged = (2 * 4 + 3 * 4 + 1 * 6 + 1 * 20 + 3 * 5) * 4
    hooks = 4 * (2 * 8 + 3 * 8 + 1 * 12 + 1 * 22 + 3 * 10)
    assert reserve_bytes(MODULES, S) == 2 * merged + 2 * hooks + 16 * 36 + 32 * 768 + 256 * 2**20 == 268461928


def _plan(avail, **kw):
    return plan_memory(
        MODULES, kw.pop("settings", S), Budget(budget=kw.pop("budget", 10**9), used=50, avail=avail, **kw), reserve=1000
    )


def test_no_limit_one_chunk():
    p = _plan(None, budget=None)
    assert [(c.names, c.bytes, c.need_unet) for c in p.chunks] == [([A, B, C, E], 5824, True)]
    assert p.stage_chunks == p.chunks and p.group_bytes == SIZES
    assert p.fallback_reasons == {D: "input 20 wide > max_gram_dim 10"}
    assert p.dims == {A: 4, B: 4, C: 6, D: 20, E: 5}
    assert {
        k: p.memory[k]
        for k in (
            "chunks",
            "unet_chunks",
            "chunk_modules",
            "statistics_estimate_bytes",
            "reserve_bytes",
            "used_at_start_bytes",
        )
    } == {
        "chunks": 1,
        "unet_chunks": 1,
        "chunk_modules": [4],
        "statistics_estimate_bytes": 5824,
        "reserve_bytes": 1000,
        "used_at_start_bytes": 50,
    }


def test_room_for_the_largest_group_splits_text_from_unet_and_by_size():
    p = _plan(3744)  # 800 + 3744 + 1280 > 3744: text first on its own, then C, then E (C + E > 3744)
    assert [(c.names, c.bytes, c.need_unet) for c in p.chunks] == [
        ([A, B], 800, False),
        ([C], 3744, True),
        ([E], 1280, True),
    ]
    assert (p.memory["chunks"], p.memory["unet_chunks"], p.memory["statistics_estimate_bytes"]) == (3, 2, 3744)
    assert p.chunks[0].context == [] and list(p.fallback_reasons) == [D]
    p = _plan(5824)  # everything fits: one chunk again
    assert [c.names for c in p.chunks] == [[A, B, C, E]]


def test_a_group_over_the_budget_falls_back_and_none_fitting_is_an_error():
    p = _plan(1300)  # C's 3744 does not fit; E's 1280 does
    assert [(c.names, c.bytes) for c in p.chunks] == [([A, B], 800), ([E], 1280)]
    assert sorted(p.fallback_reasons) == [C, D] and "do not fit the memory budget" in p.fallback_reasons[C]
    with pytest.raises(WeightsmithError, match="cannot fit any layer's statistics"):
        _plan(100)


def test_an_automatic_budget_with_no_room_is_raised_to_what_is_free():
    p = _plan(100, budget=1000, free=10**6, raise_to_free=True)
    assert p.memory["budget_bytes"] == 10**6 and p.memory["statistics_budget_bytes"] == 10**6 - 50 - 1000
    assert "budget raised to what is free" in p.memory["budget_rule"]
    assert [c.names for c in p.chunks] == [[A, B, C, E]]
    with pytest.raises(WeightsmithError, match="cannot fit"):  # a budget the user gave is not raised
        _plan(100, budget=1000, free=10**6, raise_to_free=False)


def test_the_sequential_schedule_cuts_chunks_at_the_depth_stages():
    seq = PlanSettings(batch=2, latent=8, levels=2, tokens=3, max_gram_dim=10, sequential=True)
    p = _plan(None, budget=None, settings=seq)
    assert [c.names for c in p.chunks] == [[A, B, C, E]]
    assert [(c.names, c.bytes) for c in p.stage_chunks] == [([A, B], 800), ([C], 3744), ([E], 1280)]
    assert p.memory["stage_chunks"] == 3


def test_the_plan_follows_the_model_familys_declaration_not_the_module_prefix():
    """A family declares how its denoiser's modules are seen (DenoiserStats); the plan uses the one in
    its settings (the merge passes its model's family's) even where another registered family holds the
    same prefix (Flux's ``transformer.``), and the registered one without it."""
    import re

    from weightsmith.core import families
    from weightsmith.core.families.base import DenoiserStats
    from weightsmith.core.merge.memory_plan import depth_stage
    from weightsmith.core.merge.stats import input_group

    x, y, z = "transformer.blocks.0.a", "transformer.blocks.0.b", "transformer.blocks.1.a"
    own = DenoiserStats(
        "transformer.",
        lambda n: (9 - int(n.split(".")[2]),),  # deeper blocks first, against Flux's order
        lambda n, levels, latent, tokens: 7,
        shared_inputs=((re.compile(r"^(transformer\.blocks\.\d+)\.(a|b)$"), r"\1.ab"),),
    )
    flux = families.get("flux").sampler.stats
    assert flux.prefix == own.prefix  # the same prefix, other statistics
    mods = [ModuleSize(x, 4, 4, 4, (1,)), ModuleSize(y, 4, 4, 4, (1,)), ModuleSize(z, 4, 4, 4, (1,))]
    base = dict(batch=2, latent=8, levels=2, tokens=3, max_gram_dim=10, sequential=True)
    p = plan_memory(mods, PlanSettings(**base, denoiser=own), Budget(budget=None, used=0, avail=None), 0)
    assert sorted(p.group_bytes) == ["transformer.blocks.0.ab", "transformer.blocks.1.ab"]
    assert [c.names for c in p.stage_chunks] == [[z], [x, y]]
    assert level_rows(x, 2, 2, 8, 3, denoiser=own) == 2 * 7
    # without a declaration: the registered family of the prefix (Flux: image tokens (8/2)² + text 3)
    q = plan_memory(mods, PlanSettings(**base), Budget(budget=None, used=0, avail=None), 0)
    assert sorted(q.group_bytes) == [x, y, z] and [c.names for c in q.stage_chunks] == [[x, y, z]]
    assert level_rows(x, 2, 2, 8, 3) == 2 * (16 + 3) and depth_stage(x) == flux.depth_stage(x) == (2,)
    single = "transformer.single_transformer_blocks.0."
    assert input_group(single + "proj_mlp") == input_group(single + "attn.to_q") == single + "in"


def test_progress_costs_do_not_grow_with_the_iterations(tiny_models):
    """The run's progress ticks are held as one block per kind of round (was one entry per tick of
    every iteration, allocated up front: 14 GB for --iterations 1000000000)."""
    from weightsmith.core.lab.random_loras import random_lora
    from weightsmith.core.lora_read import lora_from_state_dict
    from weightsmith.core.merge import MergeOptions
    from weightsmith.core.merge.iteris import IterISSolver
    from weightsmith.core.merge.sampling import make_samples
    from weightsmith.core.progress import Steps

    model = tiny_models["sd1"]
    loras = [
        lora_from_state_dict(random_lora(model, groups=("te", "attn"), rank=2, seed=s)[0], model, name=f"l{s}")
        for s in (1, 2)
    ]
    samples = [make_samples(["a red cat"], 2, 0), make_samples(["a blue car"], 2, 0)]
    solvers = {
        it: IterISSolver(
            model,
            loras,
            [1.0, 1.0],
            samples,
            MergeOptions(iterations=it, samples=2, steps=1, latent_size=8, batch_size=2),
        )
        for it in (2, 50)
    }
    blocks = {it: s.cost_blocks() for it, s in solvers.items()}
    assert [len(b) for b, _ in blocks[2]] == [len(b) for b, _ in blocks[50]]
    assert [r for _, r in blocks[50]] == [1, 50, 1]
    for it, s in solvers.items():
        flat = s.unit_costs()
        assert len(flat) == sum(len(b) * r for b, r in blocks[it])
        per_pass = len(s.plan) * 2  # chunks × LoRAs, every round (Jacobi)
        assert s.planned_passes() == per_pass * (1 + it + 1)
        steps = Steps(len(flat), cost_blocks=blocks[it])
        for n in (0, 1, len(flat) // 3, len(flat)):
            assert steps._cost_to(n) == pytest.approx(sum(flat[:n]), rel=1e-12)
    huge = Steps(10**9 + 2, cost_blocks=[([1.0], 1), ([0.5, 2.0], 5 * 10**8), ([3.0], 1)])
    assert huge._cost_to(10**9 + 2) == 1.0 + 1.25 * 10**9 + 3.0
