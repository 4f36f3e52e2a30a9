"""IterIS's memory plan (docs/merge.md, "Memory"): which modules' statistics are collected in the
same passes so that they fit the budget, as a plain function of the modules' sizes and the budget.

:func:`plan_memory` takes what it needs as numbers (:class:`ModuleSize` per module, the sampling
settings as :class:`PlanSettings`, the budget as :class:`Budget`) and returns a :class:`MemoryPlan`;
the solver (:class:`.iteris.IterISSolver`) measures those numbers on its model and LoRAs and runs
the plan. Modules reading the same input tensor form one input group (one set of Gram matrices,
:func:`.stats.input_group`); text-only groups come first and in chunks of their own (their passes
need no UNet run); a group whose statistics alone exceed the budget falls back to the weighted sum.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from .. import memory
from ..errors import WeightsmithError
from .sampling import denoiser_stats, is_context_only, is_denoiser
from .stats import input_group


def needs_unet(name: str, denoiser=None) -> bool:
    """A denoiser module whose inputs only a denoiser pass produces (not SD's cross-attention k/v);
    ``denoiser``: the model family's ``DenoiserStats`` (None: :func:`.sampling.denoiser_stats` finds it)."""
    return is_denoiser(name, denoiser) and not is_context_only(name, denoiser)


def depth_stage(name: str, denoiser=None) -> tuple:
    """Depth order of the sequential schedule: text-encoder layers one by one (SDXL's two encoders side by
    side, Flux's T5 blocks), then the denoiser's stages as its family declares them
    (:class:`~weightsmith.core.families.base.DenoiserStats`; SD: cross-attention k/v, down blocks, middle
    block, up blocks; Flux: the double blocks with the input layers, the single blocks, the output layers)."""
    st = denoiser_stats(name, denoiser)
    if st is None:
        m = re.search(r"\.(?:layers|block)\.(\d+)\.", name)
        return (0, int(m.group(1)) if m else 0)
    return st.depth_stage(name)


def level_rows(name: str, levels: int, batch: int, latent: int, tokens: int, cap: int = 0, denoiser=None) -> int:
    """Rows one forward batch feeds module ``name``: tokens in the text encoders, what the denoiser's
    family declares for its modules (SD: tokens for cross-attention k/v, pixels of the block's resolution
    level elsewhere, ``levels`` being the UNet's number of levels; Flux: image plus text tokens, an upper
    bound); at most ``cap`` per item."""
    st = denoiser_stats(name, denoiser)
    per = tokens if st is None else st.rows(name, levels, latent, tokens)
    return batch * (min(per, cap) if cap else per)


@dataclass
class Chunk:
    """Modules whose statistics are collected in the same passes."""

    names: list
    need_unet: bool
    context: list
    bytes: int


def make_chunk(names, nbytes: int, denoiser=None) -> Chunk:
    return Chunk(
        sorted(names),
        any(needs_unet(n, denoiser) for n in names),
        [n for n in names if is_context_only(n, denoiser)],
        nbytes,
    )


@dataclass(frozen=True)
class ModuleSize:
    """One merged module as the plan sees it. ``in_dim``: width of its input rows (the Gram matrices'
    side); ``out_dim``: its weight's rows; ``row_numel``: elements of one weight row; ``ranks``: the rank
    of each LoRA that adapts it, in LoRA order."""

    name: str
    in_dim: int
    out_dim: int
    row_numel: int
    ranks: tuple


@dataclass(frozen=True)
class PlanSettings:
    """What the plan's sizes depend on besides the modules. ``c_norm``: a float32 ``C`` is kept per group
    (α₁ > 0 beyond iteration 0); ``act_bytes``: bytes of one queued input value (the model's dtype);
    ``store_bytes``: of one value of the merge's factors; ``hook_bytes``: of the hooks' factor copies;
    ``levels``: the UNet's resolution levels; ``sequential``: also cut the chunks at the depth stages."""

    batch: int
    latent: int
    levels: int
    max_rows: int = 0
    max_gram_dim: int = 6144
    c_norm: bool = False
    act_bytes: int = 4
    store_bytes: int = 4
    hook_bytes: int = 4
    tokens: int = 77
    sequential: bool = False
    denoiser: object = None  # the model family's DenoiserStats (None: found by the module names' prefix)


@dataclass(frozen=True)
class Budget:
    """Bytes where the statistics live: ``budget`` in all (None: unknown, no limit), ``used`` at the start,
    ``avail`` left for statistics (``budget - used - reserve`` as measured; None: no limit). ``free``:
    what the machine could still give, consulted when ``raise_to_free`` (an automatic budget on the CPU)
    and the default share leaves no room for the smallest group."""

    budget: int | None
    used: int
    avail: int | None
    free: int | None = None
    raise_to_free: bool = False


@dataclass(frozen=True)
class MemoryPlan:
    """The plan: ``chunks`` (each gets its own passes), ``stage_chunks`` (the sequential schedule's chunks,
    the same as ``chunks`` otherwise), ``dims`` (input width per module), ``group_bytes`` (statistics
    estimate per input group), ``fallback_reasons`` (modules left to the weighted sum, and why) and
    ``memory`` (the report's figures)."""

    chunks: tuple
    stage_chunks: tuple
    dims: dict = field(default_factory=dict)
    group_bytes: dict = field(default_factory=dict)
    fallback_reasons: dict = field(default_factory=dict)
    memory: dict = field(default_factory=dict)


def group_bytes(members: list, sizes: dict, s: PlanSettings) -> int:
    """Statistics of one input group: ``H`` (or ``G``) float64 and ``C`` float32, one float64 denominator
    per module, the ``D = down·C`` projections (float64, two copies) and one batch of queued input rows."""
    d = sizes[members[0]].in_dim
    b = 8 * d * d + (4 * d * d if s.c_norm else 0)
    b += len(members) * 8 * d * d
    b += sum(8 * r * d for n in members for r in sizes[n].ranks) * 2
    b += level_rows(members[0], s.levels, s.batch, s.latent, s.tokens, s.max_rows, s.denoiser) * d * s.act_bytes
    return b


def reserve_bytes(modules: list, s: PlanSettings) -> int:
    """Kept outside the statistics: the merge (current + next, downs only), its hook copy and each LoRA's,
    one module's solve (Cholesky factor + right-hand side) and float64 copies of one batch of rows (of the
    modules that get statistics, those at most ``max_gram_dim`` wide: the widest, the largest batch), and
    256 MB."""
    solved = [m for m in modules if m.in_dim <= s.max_gram_dim]
    merged = sum(sum(m.ranks) * m.row_numel * s.store_bytes for m in modules)
    hook = sum(s.hook_bytes * r * (m.out_dim + m.in_dim) for m in modules for r in m.ranks)
    wide = max([m.in_dim for m in solved], default=1)
    row_block = max(
        [level_rows(m.name, s.levels, s.batch, s.latent, s.tokens, denoiser=s.denoiser) * m.in_dim for m in solved],
        default=1,
    )
    return 2 * merged + 2 * hook + 16 * wide * wide + 4 * 8 * row_block + 256 * 2**20


def plan_memory(modules: list, s: PlanSettings, budget: Budget, reserve: int) -> MemoryPlan:
    """Chunks of modules whose statistics fit ``budget`` (``reserve``: :func:`reserve_bytes`, already
    counted in ``budget.avail``). Refuses (one sentence) when no group fits at all."""
    sizes = {m.name: m for m in modules}
    dims = {m.name: m.in_dim for m in modules}
    reasons: dict[str, str] = {}
    groups: dict[str, list] = {}
    for m in modules:
        if m.in_dim > s.max_gram_dim:
            reasons[m.name] = f"input {m.in_dim} wide > max_gram_dim {s.max_gram_dim}"
            continue
        groups.setdefault(input_group(m.name, s.denoiser), []).append(m.name)
    total, used, avail = budget.budget, budget.used, budget.avail
    mem = {
        "budget_bytes": total,
        "used_at_start_bytes": used,
        "reserve_bytes": reserve,
        "statistics_budget_bytes": avail,
    }

    def unet_group(g):
        return any(needs_unet(n, s.denoiser) for n in groups[g])

    # text-only groups first and in chunks of their own: their passes need no UNet run
    order = sorted(groups, key=lambda g: (unet_group(g), g))
    gsize = {g: group_bytes(groups[g], sizes, s) for g in order}
    if budget.raise_to_free and avail is not None and gsize and min(gsize.values()) > avail:
        # the default share leaves no room (a web UI already holds its model): what the machine
        # still has free instead (docs/merge.md, "Memory")
        free = budget.free
        if free is not None and (total is None or free > total):
            mem["budget_rule"] = (
                f"the process already held {memory.gib(used)} of the default "
                f"{memory.gib(total)} ({int(memory.DEFAULT_SHARE * 100)}% of the "
                f"machine); budget raised to what is free: {memory.gib(free)}"
            )
            total, avail = free, free - used - reserve
            mem.update(budget_bytes=total, statistics_budget_bytes=avail)
    split = avail is not None and sum(gsize.values()) > avail
    chunks, cur, cur_b, too_big = [], [], 0, []
    for g in order:
        if cur and split and unet_group(g) and not unet_group(input_group(cur[0], s.denoiser)):
            chunks.append((cur, cur_b))
            cur, cur_b = [], 0
        b = gsize[g]
        if avail is not None and b > avail:
            too_big.append((g, b))
            for n in groups[g]:
                reasons[n] = (
                    f"its statistics ({memory.gib(b)}) do not fit the memory budget "
                    f"({memory.gib(max(avail, 0))} left for statistics)"
                )
            continue
        if cur and avail is not None and cur_b + b > avail:
            chunks.append((cur, cur_b))
            cur, cur_b = [], 0
        cur += groups[g]
        cur_b += b
    if cur:
        chunks.append((cur, cur_b))
    if too_big and not chunks:
        raise WeightsmithError(
            f"IterIS cannot fit any layer's statistics in the memory budget: {memory.gib(total)} in all, "
            f"{memory.gib(used)} already in use (model and LoRAs) and {memory.gib(reserve)} kept for the merge, "
            f"which leaves {memory.gib(max(avail, 0))}; the smallest layer's statistics need "
            f"{memory.gib(min(b for _, b in too_big))}. Raise the budget "
            "(--max-memory / 'Memory budget'), hold the model in half precision, or use method 'linear'."
        )
    out = [make_chunk(names, b, s.denoiser) for names, b in chunks]
    mem.update(
        chunks=len(out),
        unet_chunks=sum(c.need_unet for c in out),
        chunk_modules=[len(c.names) for c in out],
        statistics_estimate_bytes=max([c.bytes for c in out], default=0),
    )
    stages = out
    if s.sequential:  # every memory chunk cut at the depth stages, shallow to deep
        staged = []
        for c in out:
            by: dict = {}
            for n in c.names:
                by.setdefault(depth_stage(n, s.denoiser), []).append(n)
            staged += [
                (st, make_chunk(ns, sum(gsize[g] for g in {input_group(n, s.denoiser) for n in ns}), s.denoiser))
                for st, ns in by.items()
            ]
        stages = [c for _, c in sorted(staged, key=lambda t: t[0])]
        mem["stage_chunks"] = len(stages)
    return MemoryPlan(tuple(out), tuple(stages), dims, gsize, reasons, mem)
