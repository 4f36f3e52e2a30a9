"""The embedded default world: a deterministic shapes renderer, a tiny pixel-space
text-to-image model built from the stock SD component classes, a judge CNN that reads the
rendered attributes back, and four example kohya LoRAs: a clean pair (subject ``zq`` -> star,
style ``zx style`` -> stripes, trained with regularization images) and an interfering pair (the
same traits with triggers ``zk`` / ``zv style``, no regularization images, the same modules).

Names that are also submodules (``render``, ``sample``, ``judge``) are not re-exported:
import them from their submodule. Submodules: ``render`` (scenes, prompts), ``sample`` (load_model, sample), ``judge``,
``metrics`` (concept_rate, image_drift), ``paths`` (asset locations), ``tokenizer``, ``grid``
(image grids), ``evaluate`` (the held-out prompt sets and metrics of the demo and ``bench quality``),
and the sub-package ``training`` (``train_model``, ``train_judge``, ``train_loras``: the retraining
scripts; ``apply_lora`` helper). What runs the solvers on the world (the demo, ``bench quality``, the
model card's figures) is in :mod:`weightsmith.core.lab`.
"""

from .paths import DEFAULT_MODEL_DIR, JUDGE_PATH, LORA_STYLE, LORA_SUBJECT  # noqa: F401

_LAZY = {
    "render_batch": "render",
    "Scene": "render",
    "Obj": "render",
    "prompt_for": "render",
    "random_scene": "render",
    "simple_prompt": "render",
    "compositional_prompt": "render",
    "load_model": "sample",
    "load_judge": "judge",
    "concept_rate": "metrics",
    "image_drift": "metrics",
    "apply_lora": "training.train_loras",
}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        mod = importlib.import_module(f".{_LAZY[name]}", __name__)
        return getattr(mod, name)
    raise AttributeError(name)
