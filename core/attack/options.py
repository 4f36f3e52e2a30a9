"""Settings of an attack, declared once for every front end (docs/robustness.md, "The attacks").

Each field carries its default, help text, range and CLI flag (:func:`..optspec.option`); the CLI
reads them from here. Importable without torch.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import require
from ..optspec import check_declared, option

#: the attacks, in the order the bench and the CLI list them
ATTACKS = ("continuous", "discrete", "closed-form")
ATTACK_HELP = (
    "continuous: learn k token embeddings in the prompt (concept inversion / UnlearnDiffAtk); "
    "discrete: gradient-guided substitution of k typed words (P4D-K / UnlearnDiffAtk-discrete); "
    "closed-form: the UNet conditioning the edited cross-attention maps closest to the target's "
    "original keys and values (RECE's close_regzero), fed to the UNet directly."
)


@dataclass
class AttackOptions:
    """Budget and seeds of an attack (docs/robustness.md, "Budgets")."""

    tokens: int = option(
        3, "k: adversarial tokens placed at the prompt's {} slot.", flag="--tokens", lo=1, hi=16, step=1
    )
    steps: int = option(
        30,
        "Optimisation steps (continuous: Adam steps; discrete: substitution rounds, one slot position each).",
        flag="--steps",
        lo=1,
        hi=10000,
        step=1,
    )
    candidates: int = option(
        8,
        "Discrete attack: vocabulary tokens tried per round (the best-scored by the one-hot gradient).",
        flag="--candidates",
        lo=1,
        hi=4096,
        step=1,
    )
    lr: float = option(
        0.05,
        "Continuous attack: Adam step size (× the typical norm of a token embedding).",
        flag="--lr",
        lo=1e-6,
        hi=10.0,
    )
    images: int = option(
        8,
        "Images of the target drawn by the unedited model that the attack's loss is computed on.",
        flag="--images",
        lo=1,
        hi=4096,
        step=1,
    )
    draws: int = option(
        2,
        "Noise draws (timestep, noise) per target image in the fixed loss set and in each continuous step.",
        flag="--draws",
        lo=1,
        hi=64,
        step=1,
    )
    draw_steps: int = option(
        20, "Sampling steps used to draw the target images and the attack's images.", flag="--draw-steps", lo=1, hi=1000
    )
    guidance: float | None = option(
        None,
        "Classifier-free guidance scale of every drawing (1: none; default: 1.5 for a pixel-space model such as "
        "the embedded world's, its sampler's, and 7.5 for a latent Stable Diffusion model).",
        flag="--guidance",
        lo=1.0,
        hi=50.0,
    )
    reg: float = option(
        0.01,
        "Closed-form attack: ridge λ (× mean eigenvalue of Σ W'ᵀW') pulling the adversarial conditioning "
        "toward zero, so it stays a plausible input (RECE's close_regzero; 0.01 is the hardening rounds' default).",
        flag="--reg",
        lo=0.0,
        hi=1e6,
    )
    loss: str = option(
        "teacher",
        "What the edited model's noise prediction on the target images is compared with: teacher = the unedited "
        "model's prediction under the target prompt (lower variance); noise = the drawn noise (the plain "
        "denoising loss of UnlearnDiffAtk).",
        flag="--loss",
        choices=("teacher", "noise"),
    )
    seed: int = option(0, "Seed of the initial tokens, the target images and the noise draws.", flag="--seed", lo=0)

    def validate(self) -> None:
        check_declared(self)
        require(self.images * self.draws <= 65536, "images × draws is above 65536; lower --images or --draws.")


__all__ = ["ATTACKS", "ATTACK_HELP", "AttackOptions"]
