"""Settings of every merge method (one dataclass so front ends can show and store them)."""
from __future__ import annotations

from dataclasses import asdict, dataclass

METHODS = ("iteris", "linear", "concat", "svd", "ties", "dare", "regmean")


@dataclass
class MergeOptions:
    # IterIS loop (spec iteris.md §1-2)
    iterations: int = 8          # Jacobi iterations after iteration 0 (0 = λ-weighted RegMean only)
    tol: float = 1e-3            # stop when ‖ΔW(t) − ΔW(t−1)‖_F / ‖ΔW(t)‖_F < tol
    alpha1: float = 1e-2         # ridge on C_i: C_i + α₁‖C_i‖_F I · ridge on H_i: H_i + α₂‖H_i‖_F I
    alpha2: float = 1e-2         # (paper: ≈1e-4 or smaller; 1e-2 measured better with few samples,
                                 # see docs/merge.md; larger pulls toward the *mean* of the deltas)
    reg_ceof: float = 0.0        # ρ: X̃_i ← (1−ρ) X̃_i + ρ X_i (the reference's knob)
    adaptive_lambda: bool = True # λ_i = ‖W0+ΔW_i‖² / ‖X_i (W0+ΔW_i)ᵀ‖²; False: λ_i = 1
    untouched: str = "skip"      # a LoRA that does not adapt a module: "skip" = it has no say in that
                                 # module's solve (this project's design), "zero" = its samples ask for
                                 # ΔW = 0 there (the paper's objective read literally; it cancels most of
                                 # a LoCon's conv part when merged with an attention-only LoRA)
    evaluate_final: bool = True  # one more paired pass to report the final merge's objective
    # sampling protocol (spec §4)
    samples: int = 8             # (prompt, seed) samples per LoRA
    steps: int = 3               # DDIM steps of each short trajectory; statistics at every step
    latent_size: int | None = None  # latent side length (default: resolution / 8, else the UNet's sample_size)
    resolution: int | None = None   # image side length in pixels (latent_size = resolution // 8)
    batch_size: int = 4
    seed: int = 0
    max_gram_dim: int = 6144     # modules with a wider input (e.g. 3×3 convs over >682 channels)
                                 # fall back to the weighted sum (reported)
    gram_device: str | None = None  # where the float64 statistics live (default: the model's device,
                                    # the CPU for MPS); "cpu" saves GPU memory on small cards
    # baselines (spec §5)
    svd_rank: int | None = None  # SVD merge rank (default: the largest input rank)
    svd_clamp_quantile: float = 0.99
    ties_density: float = 0.2    # TIES: keep this fraction of each delta's largest entries
    ties_lambda: float = 1.0
    dare_p: float = 0.5          # DARE: drop probability (survivors rescaled by 1/(1−p))

    def to_dict(self) -> dict:
        return asdict(self)
