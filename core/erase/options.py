"""Settings of an erasure, declared once for every front end (docs/method.md, "Concept erasure").

Each field carries its default, help text, range and CLI flag (:func:`..optspec.option`); the CLI,
the ComfyUI node and the A1111 tab read them from here. Importable without torch.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import require
from ..optspec import check_declared, option

METHODS = ("erasepro", "zero-residual", "uce")
TE_SUBLAYERS = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")
TOKEN_MODES = ("suffix", "last")
METHOD_HELP = (
    "erasepro: text encoder + UNet, progressive shallow to deep (docs/method.md). "
    "zero-residual: the UNet stage alone. uce: Unified Concept Editing (UNet only)."
)


@dataclass
class EraseOptions:
    """Settings of an erasure. Defaults follow docs/method.md and the public UCE script."""

    tokens: str = option(
        "suffix",
        "Which tokens carry the concept: suffix = the target's tokens and everything "
        "after them; last = the end token only.",
        label="Tokens edited",
        flag="--tokens",
        choices=TOKEN_MODES,
    )
    expand_prompts: bool | None = option(
        None,
        "Expand each concept into template prompts (None/auto: on for erasepro and zero-residual, off for uce).",
        label="Expand prompts with templates",
        flag="--expand/--no-expand",
    )
    concept_type: str = option(
        "auto", "object, style, or auto (style when the anchor says art).", choices=("object", "style", "auto")
    )
    extra_templates: tuple[str, ...] = option(
        (), "More prompt templates, each with {} where the concept goes.", flag="--template"
    )
    te_sublayers: tuple[str, ...] = option(
        ("k_proj", "v_proj"),
        "Text-encoder sub-layers ErasePro edits.",
        label="Text-encoder sub-layers (ErasePro)",
        flag="--te-sublayers",
        choices=TE_SUBLAYERS,
    )
    te_layers: tuple[int, int] | None = option(
        None,
        "Text-encoder layer range ErasePro edits, inclusive, e.g. 0-7; empty: every layer that matters.",
        label="Text-encoder layers (e.g. 0-5; empty: automatic)",
        flag="--te-layers",
    )
    unet_sublayers: tuple[str, ...] = option(
        ("to_k", "to_v"), "UNet cross-attention projections edited.", choices=("to_k", "to_v")
    )
    lam: float = option(
        0.5,
        "λ: weight of keeping the original weights (UCE, and C = λI + η_p PPᵀ with preservation).",
        label="λ (UCE / preservation weight)",
        flag="--lam",
        lo=1e-6,
        hi=100.0,
        step=0.01,
    )
    eta_erase: float = option(1.0, "η_e: weight of the erased concepts (UCE).", lo=1e-6, hi=100.0)
    eta_preserve: float = option(
        1.0,
        "η_p: weight of the preserved concepts.",
        label="η preserve",
        flag="--eta-preserve",
        lo=0.0,
        hi=100.0,
        step=0.1,
    )
    rcond: float = option(
        1e-6,
        "Numerical-rank cutoff of the solves (singular value relative to the largest).",
        label="rcond (numerical-rank cutoff)",
        flag="--rcond",
        lo=0.0,
        hi=0.5,
    )
    ridge: float | None = option(
        None,
        "None: exact if well-conditioned, else ridge 1e-2·‖XᵀX‖_F; 0: always the "
        "pseudoinverse; > 0: always this ridge.",
        flag="--ridge",
        lo=0.0,
    )
    cond_limit: float = option(
        1e-2, "Well-conditioned means smallest kept σ ≥ cond_limit·σ_max.", flag="--cond-limit", lo=0.0, hi=1.0
    )
    max_pad: int | None = option(None, "Padding tokens kept after EOS (None: all).", flag="--max-pad", lo=0)
    exact_subspace: float | None = option(
        None,
        'Split solve: exact on σ ≥ T·σ_max, ridge on the rest (None: off; docs/method.md, "Split solve").',
        flag="--exact-subspace",
        hi=1.0,
    )
    merge_tol: float | None = option(
        None,
        "Merge feature columns within this relative distance before the solve (None: off; 0: exact duplicates).",
        flag="--merge-tol",
        lo=0.0,
        hi=1.0,
        hi_open=True,
    )
    preserve_captions: bool = option(True, "Add the shipped ordinary captions to the preserve set.")
    harden_rounds: int = option(
        0,
        "Hardening rounds: each round derives, per edited stage, the input the edited weights map closest "
        "to the target's original output (closed form), adds it to the erase set paired with the anchor and "
        'solves again. Each round costs about one more solve per stage (docs/method.md, "Hardening rounds").',
        label="Hardening rounds",
        flag="--harden-rounds",
        lo=0,
        hi=10,
        step=1,
    )
    harden_reg: float = option(
        0.01,
        "Regulariser of the hardening rounds' adversarial inputs, relative to the mean eigenvalue of the "
        "stage's Gram matrix: larger keeps them closer to 0 (more plausible), smaller lets them reach further.",
        label="Hardening regulariser",
        flag="--harden-reg",
        lo=1e-6,
        hi=10.0,
    )

    def validate(self) -> None:
        """Each option against its declaration (:func:`..optspec.check_declared`: type, range, choices),
        then the rules that relate options or shape text."""
        check_declared(self)
        if self.exact_subspace is not None:
            require(
                self.rcond < self.exact_subspace,
                f"exact_subspace (--exact-subspace) must be above rcond ({self.rcond!r}) and at most 1 (a singular "
                f"value relative to the largest; 1e-2 is usual), got {self.exact_subspace!r}.",
            )
            require(
                self.ridge != 0,
                "exact_subspace (--exact-subspace) puts a ridge on the weak directions, but ridge (--ridge) is 0; "
                "leave --ridge out (1e-2) or give a positive one. For an exact solve everywhere use --ridge 0 alone.",
            )
        if self.te_layers is not None:
            require(len(self.te_layers) == 2, f"te_layers (--te-layers) is a range START-END, got {self.te_layers!r}.")
            a, b = self.te_layers
            require(0 <= a <= b, f"invalid text-encoder layer range {a}-{b}; use START-END with 0 <= START <= END.")
        for t in self.extra_templates:
            require(
                t.count("{}") == 1 and "{" not in t.replace("{}", "") and "}" not in t.replace("{}", ""),
                f"template {t!r} must contain exactly one {{}} where the concept goes and no other braces, "
                'e.g. "a photo of {} at night".',
            )


def check_method_options(method: str, opts: EraseOptions) -> None:
    """Options that only some methods read are refused for the others (instead of silently ignored)."""
    require(
        method != "uce" or (opts.exact_subspace is None and opts.merge_tol is None),
        "exact_subspace (--exact-subspace) and merge_tol (--merge-tol) shape the zero-residual solve; UCE has "
        "its own closed form and would ignore them. Use --method erasepro or zero-residual, or drop them.",
    )
