"""Settings of an erasure, declared once for every front end (docs/method.md, "Concept erasure").

Each field carries its default, help text, range and CLI flag (:func:`..optspec.option`); the CLI,
the ComfyUI node and the A1111 tab read them from here. Importable without torch.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from ..errors import require
from ..optspec import option

METHODS = ("erasepro", "zero-residual", "uce")
TE_SUBLAYERS = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")
TOKEN_MODES = ("suffix", "last")
METHOD_HELP = ("erasepro: text encoder + UNet, progressive shallow to deep (docs/method.md). "
               "zero-residual: the UNet stage alone. uce: Unified Concept Editing (UNet only).")


@dataclass
class EraseOptions:
    """Settings of an erasure. Defaults follow docs/method.md and the public UCE script."""

    tokens: str = option("suffix", "Which tokens carry the concept: suffix = the target's tokens and everything "
                         "after them; last = the end token only.", label="Tokens edited", flag="--tokens",
                         choices=TOKEN_MODES)
    expand_prompts: bool | None = option(None, "Expand each concept into template prompts (None/auto: on for "
                                         "erasepro and zero-residual, off for uce).",
                                         label="Expand prompts with templates", flag="--expand/--no-expand")
    concept_type: str = option("auto", "object, style, or auto (style when the anchor says art).",
                               choices=("object", "style", "auto"))
    extra_templates: tuple[str, ...] = option((), "More prompt templates, each with {} where the concept goes.",
                                              flag="--template")
    te_sublayers: tuple[str, ...] = option(("k_proj", "v_proj"), "Text-encoder sub-layers ErasePro edits.",
                                           label="Text-encoder sub-layers (ErasePro)", flag="--te-sublayers",
                                           choices=TE_SUBLAYERS)
    te_layers: tuple[int, int] | None = option(None, "Text-encoder layer range ErasePro edits, inclusive, e.g. "
                                               "0-7; empty: every layer that matters.",
                                               label="Text-encoder layers (e.g. 0-5; empty: automatic)",
                                               flag="--te-layers")
    unet_sublayers: tuple[str, ...] = option(("to_k", "to_v"), "UNet cross-attention projections edited.",
                                             choices=("to_k", "to_v"))
    lam: float = option(0.5, "λ: weight of keeping the original weights (UCE, and C = λI + η_p PPᵀ with "
                        "preservation).", label="λ (UCE / preservation weight)", flag="--lam", lo=1e-6, hi=100.0,
                        step=0.01)
    eta_erase: float = option(1.0, "η_e: weight of the erased concepts (UCE).", lo=1e-6, hi=100.0)
    eta_preserve: float = option(1.0, "η_p: weight of the preserved concepts.", label="η preserve",
                                 flag="--eta-preserve", lo=0.0, hi=100.0, step=0.1)
    rcond: float = option(1e-6, "Numerical-rank cutoff of the solves (singular value relative to the largest).",
                          label="rcond (numerical-rank cutoff)", flag="--rcond", lo=0.0, hi=0.5)
    ridge: float | None = option(None, "None: exact if well-conditioned, else ridge 1e-2·‖XᵀX‖_F; 0: always the "
                                 "pseudoinverse; > 0: always this ridge.", flag="--ridge", lo=0.0)
    cond_limit: float = option(1e-2, "Well-conditioned means smallest kept σ ≥ cond_limit·σ_max.",
                               flag="--cond-limit", lo=0.0, hi=1.0)
    max_pad: int | None = option(None, "Padding tokens kept after EOS (None: all).", flag="--max-pad", lo=0)
    exact_subspace: float | None = option(None, "Split solve: exact on σ ≥ T·σ_max, ridge on the rest (None: off; "
                                          "docs/method.md, \"Split solve\").", flag="--exact-subspace")
    merge_tol: float | None = option(None, "Merge feature columns within this relative distance before the solve "
                                     "(None: off; 0: exact duplicates).", flag="--merge-tol")
    preserve_captions: bool = option(True, "Add the shipped ordinary captions to the preserve set.")

    def validate(self) -> None:
        require(self.tokens in TOKEN_MODES, f"unknown token mode {self.tokens!r}; use suffix or last.")
        bad = [s for s in self.te_sublayers if s not in TE_SUBLAYERS]
        require(not bad, f"unknown text-encoder sub-layer(s) {bad}; choose from {', '.join(TE_SUBLAYERS)}.")
        require(all(s in ("to_k", "to_v") for s in self.unet_sublayers),
                "UNet sub-layers must be to_k and/or to_v (the cross-attention projections).")
        nums = {"lam (λ, --lam)": self.lam, "eta_erase": self.eta_erase, "eta_preserve (--eta-preserve)": self.eta_preserve,
                "rcond (--rcond)": self.rcond, "cond_limit (--cond-limit)": self.cond_limit}
        if self.ridge is not None:
            nums["ridge (--ridge)"] = self.ridge
        for k, v in nums.items():
            require(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v),
                    f"{k} must be a finite number, got {v!r}.")
        require(self.lam > 0, "lam (λ) must be > 0.")
        require(self.rcond >= 0 and (self.ridge is None or self.ridge >= 0) and self.cond_limit >= 0,
                "rcond, ridge and cond_limit must be >= 0.")
        require(self.rcond < 1, f"rcond (--rcond) must be below 1 (a relative singular-value cutoff; 1e-6 is usual), "
                f"got {self.rcond!r}.")
        require(self.cond_limit <= 1, f"cond_limit (--cond-limit) must be at most 1 (relative to the largest singular value), "
                f"got {self.cond_limit!r}.")
        require(self.eta_preserve >= 0, f"eta_preserve (η_p, --eta-preserve) must be >= 0, got {self.eta_preserve!r}.")
        require(self.eta_erase > 0, f"eta_erase (η_e) must be > 0, got {self.eta_erase!r}.")
        require(self.max_pad is None or (int(self.max_pad) == self.max_pad and self.max_pad >= 0),
                f"max_pad (--max-pad) must be a whole number >= 0 (padding tokens kept after EOS), got {self.max_pad!r}.")
        for k, v in (("exact_subspace (--exact-subspace)", self.exact_subspace), ("merge_tol (--merge-tol)", self.merge_tol)):
            require(v is None or (isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)),
                    f"{k} must be a finite number, got {v!r}.")
        if self.exact_subspace is not None:
            require(self.rcond < self.exact_subspace <= 1,
                    f"exact_subspace (--exact-subspace) must be above rcond ({self.rcond!r}) and at most 1 (a singular "
                    f"value relative to the largest; 1e-2 is usual), got {self.exact_subspace!r}.")
            require(self.ridge != 0,
                    "exact_subspace (--exact-subspace) puts a ridge on the weak directions, but ridge (--ridge) is 0; "
                    "leave --ridge out (1e-2) or give a positive one. For an exact solve everywhere use --ridge 0 alone.")
        if self.merge_tol is not None:
            require(0 <= self.merge_tol < 1,
                    f"merge_tol (--merge-tol) must be >= 0 and below 1 (a distance relative to a column's norm; "
                    f"0 merges exact duplicates, 0.05 near-duplicates), got {self.merge_tol!r}.")
        if self.te_layers is not None:
            a, b = self.te_layers
            require(0 <= a <= b, f"invalid text-encoder layer range {a}-{b}; use START-END with 0 <= START <= END.")
        for t in self.extra_templates:
            require(isinstance(t, str) and t.count("{}") == 1 and "{" not in t.replace("{}", "")
                    and "}" not in t.replace("{}", ""),
                    f"template {t!r} must contain exactly one {{}} where the concept goes and no other braces, "
                    "e.g. \"a photo of {} at night\".")


def check_method_options(method: str, opts: EraseOptions) -> None:
    """Options that only some methods read are refused for the others (instead of silently ignored)."""
    require(method != "uce" or (opts.exact_subspace is None and opts.merge_tol is None),
            "exact_subspace (--exact-subspace) and merge_tol (--merge-tol) shape the zero-residual solve; UCE has "
            "its own closed form and would ignore them. Use --method erasepro or zero-residual, or drop them.")
