"""Closed-form concept erasure: ErasePro, its zero-residual ablation, and UCE (docs/method.md,
"Concept erasure").

    from weightsmith.core.model_io import load_model
    from weightsmith.core.erase import erase, EraseOptions

    model = load_model("model.safetensors")
    edit = erase(model, targets=["Van Gogh"], anchors=["art"], method="erasepro")
    edit.report["stages"]          # per-matrix ‖Δ‖/‖W_o‖ and residuals
    edited = edit.apply(model)     # a modified copy; `model` is unchanged
"""

from .options import METHODS, EraseOptions

__all__ = ["erase", "EraseOptions", "METHODS"]


def __getattr__(name):  # torch is imported on first use of erase, so the options load without it
    if name == "erase":
        from .pipeline import erase

        return erase
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
