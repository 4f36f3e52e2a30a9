"""Settings of every merge method, declared once for every front end (CLI, ComfyUI, A1111).

Each field carries its default, help text, range and CLI flag (:func:`..optspec.option`).
Importable without torch.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from ..optspec import check_declared, option

METHODS = ("iteris", "linear", "concat", "svd", "ties", "dare", "regmean")
#: the methods that read only the LoRAs (no statistics from the model): the ones every family has (Flux.1)
DATA_FREE = ("linear", "concat", "svd", "ties", "dare")


@dataclass
class MergeOptions:
    # IterIS loop (docs/method.md, "LoRA merging")
    iterations: int = option(
        8,
        "IterIS Jacobi iterations after iteration 0 (0 = λ-weighted RegMean only).",
        label="Iterations",
        flag="--iterations",
        lo=0,
        hi=50,
    )
    schedule: str = option(
        "jacobi",
        "IterIS, how an iteration refreshes the layers' inputs: jacobi = every layer from "
        "one paired pass with the previous merge (the reference); sequential = shallow to deep, "
        "each depth stage's inputs taken with the shallower stages already updated in this "
        "iteration (more passes; this project's design, docs/merge.md).",
        label="Schedule",
        flag="--schedule",
        choices=("jacobi", "sequential"),
    )
    tol: float = option(1e-3, "Stop when ‖ΔW(t) − ΔW(t−1)‖_F / ‖ΔW(t)‖_F falls below this.", flag="--tol", lo=0.0)
    # ridge on C_i: C_i + α₁‖C_i‖_F I · ridge on H_i: H_i + α₂‖H_i‖_F I (paper: ≈1e-4 or smaller; 1e-2 measured
    # better with few samples, see docs/merge.md; larger pulls toward the *mean* of the deltas)
    alpha1: float = option(
        1e-2, "Ridge α₁ on the inner Gram matrices C_i (relative to ‖C_i‖_F).", flag="--alpha", lo=0.0
    )
    alpha2: float = option(
        1e-2, "Ridge α₂ on the outer Gram matrices H_i (relative to ‖H_i‖_F).", flag="--alpha", lo=0.0
    )
    ridge_toward: str = option(
        "sum",
        "IterIS, where the samples leave a direction unconstrained the ridge pulls the "
        "merge toward: sum = the LoRAs' weighted sum, what stacking them gives (one ridge "
        "α₂·Σλᵢmᵢ‖Hᵢ‖ per layer; this project's design, the default since it kept each LoRA "
        "closer to its own on the embedded world, docs/merge.md); mean = the λ-weighted mean "
        "of their deltas (the paper's per-LoRA ridge).",
        label="Ridge pulls toward",
        flag="--ridge-toward",
        choices=("mean", "sum"),
    )
    reg_coef: float = option(
        0.0, "ρ: X̃_i ← (1−ρ) X̃_i + ρ X_i (the reference code's reg_ceof knob).", flag="--reg-coef", lo=0.0, hi=1.0
    )
    adaptive_lambda: bool = option(True, "λ_i = ‖W0+ΔW_i‖² / ‖X_i (W0+ΔW_i)ᵀ‖²; False: λ_i = 1.")
    untouched: str = option(
        "skip",
        "IterIS, for a layer only some LoRAs adapt: skip = the others have no say "
        "there (keeps e.g. a LoCon's conv part when merged with a plain LoRA; this project's "
        "design); zero = they ask for no change there (the paper's objective read literally).",
        label="Layers a LoRA does not adapt",
        flag="--untouched",
        choices=("skip", "zero"),
    )
    evaluate_final: bool = option(True, "One more paired pass to report the final merge's objective.")
    # sampling protocol (docs/method.md, "IterIS sampling protocol")
    samples: int = option(
        8,
        "(prompt, seed) samples per LoRA used to collect layer inputs.",
        label="Samples per LoRA",
        flag="--samples",
        lo=1,
        hi=64,
    )
    steps: int = option(
        3,
        "DDIM steps of each short sample trajectory; statistics at every step.",
        label="Denoising steps per sample",
        flag="--steps",
        lo=1,
        hi=100,
    )
    latent_size: int | None = option(
        None,
        "Latent side length (default: resolution / 8, else the UNet's sample_size).",
        flag="--latent-size",
        lo=1,
        hi=256,
    )
    resolution: int | None = option(
        None,
        "Image side length of the samples in pixels (latent = resolution / 8; "
        "default: the model's native size). Lower is faster.",
        label="Resolution",
        lo=64,
        hi=2048,
        step=64,
    )
    batch_size: int = option(4, "Samples per batch while collecting statistics.", flag="--batch-size", lo=1, hi=64)
    seed: int = option(
        0, "Seed of the sampling noise: same seed, same merge.", label="Seed", flag="--seed", lo=0, hi=2**31 - 1
    )
    max_rows: int = option(
        0,
        "Positions per sample, at most, that each layer's statistics read at every step "
        "(0 = all): a seeded random subset of the layer's pixels or tokens, the same in every "
        "pass, weighted to stand for all of them. Large latents' statistics cost less in time "
        "and memory (this project's design, docs/merge.md, 'Speed').",
        label="Positions per sample (0 = all)",
        flag="--max-rows",
        lo=0,
        hi=1 << 20,
    )
    max_gram_dim: int = option(
        6144,
        "Modules with a wider input (e.g. 3×3 convs over > 682 channels) fall back to the weighted sum (reported).",
        flag="--max-gram-dim",
        lo=1,
    )
    max_memory_gb: float = option(
        0.0,
        "Memory budget of the whole merge in GB, model included (0 = automatic: "
        "65% of the machine's memory, or of the GPU's where the statistics live). "
        "Over it, layers are processed in groups over several passes (slower, same result).",
        label="Memory budget (GB, 0 = auto)",
        flag="--max-memory",
        lo=0.0,
        hi=4096.0,
        step=0.5,
    )
    gram_device: str | None = option(
        None,
        "Where the float64 statistics live (default: the model's device, the "
        "CPU for MPS); cpu saves GPU memory on small cards.",
    )
    # baselines (docs/method.md, "Merge baselines")
    svd_rank: int | None = option(None, "SVD merge rank (default: the largest input rank).", flag="--rank", lo=1)
    svd_clamp_quantile: float = option(0.99, "SVD merge: clamp entries at this quantile.", lo=0.0, hi=1.0, lo_open=True)
    ties_density: float = option(
        0.2, "TIES: keep this fraction of each delta's largest entries.", flag="--density", lo=0.0, hi=1.0, lo_open=True
    )
    ties_lambda: float = option(1.0, "TIES: scale of the merged delta.", lo=0.0, lo_open=True)
    dare_p: float = option(
        0.5, "DARE: drop probability (survivors rescaled by 1/(1−p)).", flag="--drop", lo=0.0, hi=1.0, hi_open=True
    )

    def to_dict(self) -> dict:
        return asdict(self)

    def validate(self) -> None:
        """Refuse settings outside each method's meaning: every option against its declaration
        (:func:`..optspec.check_declared`: type, range, choices; one sentence naming the setting, its CLI
        flag and its range)."""
        check_declared(self)


ALIASES = {"reg_ceof": "reg_coef"}  # the reference code's spelling, still accepted from hosts


# The settings an IterIS merge starts from on a CPU, in the hosts' widgets and with ``--speed auto|quick``
# on the command line (docs/merge.md, "Speed"): two full-coverage LoRAs on SD1.5 in minutes on two cores
# instead of days; measured there, with what it costs on the embedded world.
QUICK = {"iterations": 2, "samples": 4, "steps": 1, "resolution": 256, "max_rows": 256, "max_gram_dim": 3072}


def machine_is_cpu() -> bool:
    """True where torch sees no GPU (CUDA or MPS): the front ends' rule for the quick settings."""
    import torch

    mps = getattr(torch.backends, "mps", None)
    return not (torch.cuda.is_available() or (mps is not None and mps.is_available()))


def host_default(name: str, cpu: bool, default=None):
    """The default a front end shows for merge option ``name``: :data:`QUICK`'s value on a CPU, else the
    declaration's (or ``default``, a host's own, e.g. ComfyUI's 512 px resolution widget)."""
    from ..optspec import spec

    if cpu and name in QUICK:
        return QUICK[name]
    return spec(MergeOptions, name).default if default is None else default


def with_quick(values: dict, cpu: bool) -> dict:
    """``values`` with every :data:`QUICK` setting it leaves out (or None) filled in, on a CPU; as given
    elsewhere. Front ends call this on what their widgets and flags hold, so the settings no widget
    shows (positions per sample, the widest statistics) follow the same rule."""
    out = dict(values)
    if cpu:
        for k, v in QUICK.items():
            if out.get(k) is None:
                out[k] = v
    return out
