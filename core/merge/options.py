"""Settings of every merge method (one dataclass so front ends can show and store them)."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from ..errors import require

METHODS = ("iteris", "linear", "concat", "svd", "ties", "dare", "regmean")


@dataclass
class MergeOptions:
    # IterIS loop (docs/method.md, "LoRA merging")
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
    # sampling protocol (docs/method.md, "IterIS sampling protocol")
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
    # baselines (docs/method.md, "Merge baselines")
    svd_rank: int | None = None  # SVD merge rank (default: the largest input rank)
    svd_clamp_quantile: float = 0.99
    ties_density: float = 0.2    # TIES: keep this fraction of each delta's largest entries
    ties_lambda: float = 1.0
    dare_p: float = 0.5          # DARE: drop probability (survivors rescaled by 1/(1−p))

    def to_dict(self) -> dict:
        return asdict(self)

    def validate(self) -> None:
        """Refuse settings outside each method's meaning (one message naming the setting and its range;
        CLI flag in brackets)."""
        def num(name, v, flag):
            require(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v),
                    f"{name} ({flag}) must be a finite number, got {v!r}.")

        def whole(name, v, lo, flag, none_ok=False):
            if v is None and none_ok:
                return
            require(isinstance(v, int) and not isinstance(v, bool) and v >= lo,
                    f"{name} ({flag}) must be a whole number >= {lo}, got {v!r}.")

        whole("iterations", self.iterations, 0, "--iterations")
        whole("samples", self.samples, 1, "--samples")
        whole("steps", self.steps, 1, "--steps")
        whole("batch_size", self.batch_size, 1, "--batch-size")
        whole("latent_size", self.latent_size, 1, "--latent-size", none_ok=True)
        whole("resolution", self.resolution, 8, "resolution", none_ok=True)
        whole("max_gram_dim", self.max_gram_dim, 1, "--max-gram-dim")
        whole("svd_rank", self.svd_rank, 1, "--rank", none_ok=True)
        whole("seed", self.seed, 0, "--seed")
        for name, v, flag in (("tol", self.tol, "--tol"), ("alpha1", self.alpha1, "--alpha"),
                              ("alpha2", self.alpha2, "--alpha"), ("reg_ceof", self.reg_ceof, "--reg-ceof"),
                              ("ties_density", self.ties_density, "--density"), ("ties_lambda", self.ties_lambda, "ties_lambda"),
                              ("dare_p", self.dare_p, "--drop"), ("svd_clamp_quantile", self.svd_clamp_quantile, "svd_clamp_quantile")):
            num(name, v, flag)
        require(self.tol >= 0, f"tol (--tol) must be >= 0, got {self.tol!r}.")
        require(self.alpha1 >= 0 and self.alpha2 >= 0,
                f"alpha1/alpha2, the ridge α (--alpha), must be >= 0 (0 = none, default {MergeOptions.alpha1:g}), got "
                f"{min(self.alpha1, self.alpha2)!r}.")
        require(0 <= self.reg_ceof <= 1, f"reg_ceof ρ (--reg-ceof) must be in [0, 1], got {self.reg_ceof!r}.")
        require(0 < self.ties_density <= 1, f"ties_density (--density) is TIES' kept fraction: it must be in (0, 1], "
                f"got {self.ties_density!r}.")
        require(self.ties_lambda > 0, f"ties_lambda must be > 0, got {self.ties_lambda!r}.")
        require(0 <= self.dare_p < 1, f"dare_p, DARE's drop probability (--drop), must be in [0, 1), got {self.dare_p!r}.")
        require(0 < self.svd_clamp_quantile <= 1, f"svd_clamp_quantile must be in (0, 1], got {self.svd_clamp_quantile!r}.")
        require(self.untouched in ("skip", "zero"),
                f"unknown untouched-module rule {self.untouched!r}; use 'skip' or 'zero'.")
