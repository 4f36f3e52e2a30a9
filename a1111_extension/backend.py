"""What the Weightsmith tab does, independent of the host (A1111, Forge, or the standalone app).

A *backend* answers host questions: the loaded model's base weights as an
:class:`~weightsmith.core.sdmodel.SDModel`, where each canonical weight lives in memory, where
LoRAs and checkpoints go, how progress and Interrupt are wired. :class:`Workbench` holds the
tab's state (the applied edit and the exact originals, see :mod:`.live_weights`) and does the
work the buttons ask for. The Gradio layout lives in :mod:`.ui`.
"""

from __future__ import annotations

import contextlib
import json
import re
import threading
from pathlib import Path

from ..core.edit import Edit
from ..core.erase.options import METHODS as ERASE_METHODS
from ..core.errors import CancelledError, WeightsmithError, require
from ..core.merge.options import METHODS as MERGE_METHODS
from ..core.naming import family_label
from ..core.prompt_lists import a1111_list, a1111_prompt_table
from .live_weights import LiveEditor, Slot

_SAFE_NAME = re.compile(r"[^A-Za-z0-9._ -]+")


def merge_methods() -> tuple[str, ...]:
    return tuple(MERGE_METHODS)


def items(text) -> list[str]:
    """A concept (or Weights) box: core's A1111 rule (core.prompt_lists.a1111_list: lines, ``;`` and
    commas outside double quotes)."""
    return a1111_list(text)


def output_name(name: str, default: str) -> str:
    name = _SAFE_NAME.sub("_", (name or "").strip()) or default
    name = name.strip(". ") or default
    if not name.lower().endswith(".safetensors"):
        name += ".safetensors"
    return name


# ----------------------------------------------------------------------------------------------
class Backend:
    """Host interface. Subclasses: :class:`StandaloneBackend`, ``a1111.A1111Backend``."""

    name = "standalone"
    can_apply = True
    apply_note = ""

    def __init__(self):
        self._cancel = threading.Event()

    # model ------------------------------------------------------------------------------------
    def model(self):
        """The loaded model's base weights (without LoRAs) as an SDModel (float32, CPU)."""
        raise NotImplementedError

    def slots(self, names) -> dict[str, Slot]:
        raise NotImplementedError

    def model_key(self):
        """Identifies the loaded model; the tab drops its state when this changes."""
        return None

    def describe(self) -> str:
        return ""

    # files ------------------------------------------------------------------------------------
    def lora_dir(self) -> Path:
        raise NotImplementedError

    def checkpoint_dir(self) -> Path:
        raise NotImplementedError

    def save_checkpoint(self, deltas: dict, out: Path, metadata: dict) -> Path:
        raise NotImplementedError

    def refresh_checkpoints(self) -> None:
        pass

    def refresh_loras(self) -> None:
        pass

    def list_loras(self) -> list[str]:
        d = self.lora_dir()
        if not d.is_dir():
            return []
        return sorted(str(p.relative_to(d)) for p in d.rglob("*.safetensors") if p.is_file())

    # jobs -------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def job(self, title: str):
        """Runs one long job; yields ``(progress, cancel)`` callables for core."""
        self._cancel.clear()
        yield (lambda done, total, label="": None), self._cancel.is_set

    def interrupt(self) -> None:
        self._cancel.set()

    @contextlib.contextmanager
    def exclusive(self):
        """Held while weights are changed (A1111: its generation queue lock)."""
        yield


class StandaloneBackend(Backend):
    """A model loaded from a file or diffusers folder; Apply edits it in memory.

    ``can_apply=False`` gives a save-only backend.

    A backend with ``attach(edit)`` / ``detach()`` / ``forget()`` (Forge, :mod:`.forge`) keeps the
    applied edit itself (as host patches) instead of the tab changing weights in place."""

    def __init__(
        self,
        model_path,
        lora_dir,
        checkpoint_dir,
        *,
        tokenizer=None,
        clip_skip=None,
        can_apply: bool = True,
        apply_note: str = "",
        name: str = "standalone",
    ):
        super().__init__()
        self._weights_dtype = None  # the UNet's precision (load_model(weights_dtype=…)); None: float32
        self.model_path = Path(model_path)
        self._lora_dir = Path(lora_dir)
        self._ckpt_dir = Path(checkpoint_dir)
        self._tokenizer = tokenizer
        self._clip_skip = clip_skip
        self._model = None
        self.can_apply = can_apply
        self.apply_note = apply_note
        self.name = name

    def model(self):
        if self._model is None:
            from ..core.model_io import load_model

            self._model = load_model(
                self.model_path, clip_skip=self._clip_skip, tokenizer=self._tokenizer, weights_dtype=self._weights_dtype
            )
        return self._model

    def slots(self, names) -> dict[str, Slot]:
        m = self.model()
        return {n: Slot(m.module(n), "weight") for n in names}

    def model_key(self):
        return str(self.model_path)

    def describe(self) -> str:
        m = self.model()
        return f"{self.model_path.name} ({family_label(m.family)})"

    def lora_dir(self) -> Path:
        return self._lora_dir

    def checkpoint_dir(self) -> Path:
        return self._ckpt_dir

    def save_checkpoint(self, deltas, out, metadata):
        from ..core.model_io import save_edited_model

        m = self.model()
        if getattr(m, "family", None) == "flux":  # the input's own layout (docs/flux.md, "Writing edits")
            from ..core.flux_io import save_flux_edit

            if m.source is not None and m.source.format == "diffusers":
                out = out.with_suffix("")
            return save_flux_edit(m, deltas, out, metadata)["files"][0]
        if m.source is not None and m.source.format == "diffusers":
            out = out.with_suffix("")  # a diffusers model is saved as a folder
            require(not out.exists(), f"{out} already exists; choose another name.")
        return save_edited_model(m, deltas, out, metadata)


# ----------------------------------------------------------------------------------------------
class Workbench:
    """The tab's state and actions. Every public method returns a status message (and raises
    :class:`WeightsmithError` with a user-facing message on bad input)."""

    def __init__(self, backend: Backend):
        self.backend = backend
        self.editor = LiveEditor()
        self.applied: Edit | None = None
        self.applied_key = None
        self.last: Edit | None = None
        self._last_report: list[dict] = []
        self.lock = threading.RLock()
        self._observer = None  # an extra progress callback (the tab's progress bar), see observing()

    # state ------------------------------------------------------------------------------------
    def _check_model(self) -> None:
        if self.applied is not None and self.backend.model_key() != self.applied_key:
            self.editor.forget()
            if hasattr(self.backend, "forget"):
                self.backend.forget()
            self.applied = None
            raise WeightsmithError(
                "the loaded model changed since the last Apply; that edit is gone with the old model. "
                "Nothing was changed; press the button again to work on the new model."
            )

    @contextlib.contextmanager
    def observing(self, progress):
        """Also report the progress of jobs started inside this block to ``progress(done, total, label)``."""
        prev, self._observer = self._observer, progress
        try:
            yield
        finally:
            self._observer = prev

    @contextlib.contextmanager
    def _job(self, title: str):
        """The backend's job (host progress, Interrupt) with the observer chained in."""
        with self.backend.job(title) as (progress, cancel):
            extra = self._observer
            if extra is None:
                yield progress, cancel
                return

            def both(done, total, label=""):
                try:
                    extra(done, total, label)
                finally:
                    progress(done, total, label)

            yield both, cancel

    def _remember(self, edit: Edit, model) -> None:
        self.last, self._last_report = edit, report_rows(edit, model)

    @property
    def last_rows(self) -> list[list]:
        """The last computed edit's report as the tab's table."""
        return layer_table(self._last_report)

    def report_for(self, edit: Edit) -> tuple[list[list], object]:
        """(table rows, picture) of ``edit``'s report (core.report)."""
        rows = self._last_report if edit is self.last else report_rows(edit, self.backend.model())
        return layer_table(rows), picture(edit, rows)

    def state_text(self) -> str:
        if self.applied is None:
            return "No edit applied."
        r = self.applied.report
        what = r.get("method", "edit")
        tgt = r.get("targets") or [l.get("name") for l in r.get("loras", []) if isinstance(l, dict)]
        return f"Applied in memory: {what} {', '.join(map(str, tgt or []))} ({len(self.applied.deltas)} weights)."

    # compute ----------------------------------------------------------------------------------
    def compute_erase(self, targets, anchors, preserve, method, advanced: dict | None = None) -> Edit:
        from ..core.erase import EraseOptions, erase

        require(method in ERASE_METHODS, f"unknown method {method!r}; choose {', '.join(ERASE_METHODS)}.")
        t = items(targets)
        require(bool(t), "enter at least one concept to erase in Targets.")
        a = items(anchors) or [""]
        opts = _options(EraseOptions, advanced or {})
        with self._job("Weightsmith: erase") as (progress, cancel):
            model = self.backend.model()
            edit = erase(
                model,
                t,
                a,
                items(preserve),
                method=method,
                options=opts,
                progress=progress,
                cancel=cancel,
                warn=lambda m: None,
            )
            self._remember(edit, model)
        return edit

    def compute_merge(
        self, lora_names, weights, prompts, method, settings: dict | None = None, blocks: str | None = None
    ) -> tuple:
        from ..core.blockweights import per_lora
        from ..core.lora_read import load_lora
        from ..core.merge import MergeOptions, merge

        names = list(lora_names or [])
        require(bool(names), "pick at least one LoRA to merge.")
        from ..core.merge.api import require_mergeable

        # core's rule (Flux: IterIS/RegMean need both text encoders), before reading
        require_mergeable(self.backend.model(), method)
        w = [float(x) for x in items(weights)] if items(weights) else None
        require(
            w is None or len(w) == len(names),
            f"give one weight per LoRA ({len(names)}), or leave Weights empty for 1 each.",
        )
        per = a1111_prompt_table(prompts)  # core.prompt_lists: the tab's rule
        p = None
        if per:
            require(
                len(per) in (1, len(names)),
                "sample prompts: one line for all LoRAs, or one line per LoRA in the order picked "
                "(several prompts on a line are separated by ; or |).",
            )
            p = per[0] if len(per) == 1 and len(names) > 1 else per
        bw = per_lora(blocks, len(names))  # one line per LoRA (docs/merge.md, "Block weights")
        from ..core.merge.options import machine_is_cpu, with_quick

        opts = _options(MergeOptions, with_quick(settings or {}, machine_is_cpu()))  # docs/merge.md, "Speed"
        with self._job("Weightsmith: merge LoRAs") as (progress, cancel):
            model = self.backend.model()
            loras = []
            for n in names:
                path = self.backend.lora_dir() / n
                require(path.is_file(), f"LoRA {n} is not in {self.backend.lora_dir()}; press Refresh.")
                loras.append(load_lora(path, model))
            edit = merge(
                model,
                loras,
                method=method,
                weights=w,
                prompts=p,
                options=opts,
                progress=progress,
                cancel=cancel,
                blocks=bw,
            )
            self._remember(edit, model)
        return edit, loras

    # apply / undo -----------------------------------------------------------------------------
    def apply(self, edit: Edit, strength: float = 1.0) -> str:
        if not self.backend.can_apply:
            raise WeightsmithError(f"Apply is not available here: {self.backend.apply_note}")
        self._check_model()
        model = self.backend.model()
        require(
            edit.family == model.family,
            f"this edit is for {family_label(edit.family)} but the loaded model is "
            f"{family_label(model.family)}; nothing was changed.",
        )
        scaled = edit.scaled(strength) if strength != 1 else edit
        combined = scaled if self.applied is None else self.applied.then(scaled)
        if hasattr(self.backend, "attach"):  # patcher hosts (Forge): the host keeps the whole edit
            with self.backend.exclusive():
                self.backend.attach(combined)
        else:
            slots = self.backend.slots(edit.deltas)
            with self.backend.exclusive():
                self.editor.apply(edit.deltas, slots, strength)
        self.applied = combined
        self.applied_key = self.backend.model_key()
        self.backend_changed()
        return (
            f"Applied to the loaded model: {len(edit.deltas)} weights changed. "
            "Generate to try it; Undo restores the original."
        )

    def undo(self) -> str:
        if self.applied is None:
            return "Nothing to undo: no edit is applied."
        try:
            self._check_model()
            with self.backend.exclusive():
                if hasattr(self.backend, "detach"):
                    n = len(self.applied.deltas)
                    self.backend.detach()
                    msg = (
                        f"Undone: the edit ({n} weights) is off the model; the original weights are back "
                        "exactly from the next image on."
                    )
                else:
                    msg = f"Undone: {self.editor.undo()} tensors restored exactly to the original weights."
        finally:
            self.applied = None
            self.backend_changed()
        return msg

    def backend_changed(self) -> None:
        hook = getattr(self.backend, "weights_changed", None)
        if hook:
            hook()

    # save -------------------------------------------------------------------------------------
    def edit_to_save(self, compute) -> tuple[Edit, str]:
        """The applied edit if there is one, else a freshly computed one (``compute()``)."""
        if self.applied is not None:
            self._check_model()
            return self.applied, "the applied edit"
        return compute(), "a newly computed edit (nothing was applied)"

    def save_lora(self, edit: Edit, name: str, rank=None, fmt: str = "lora", extra_meta=None) -> str:
        from ..core.lora_write import export_note, save_lora

        d = self.backend.lora_dir()
        out = d / output_name(name, f"ws-{edit.report.get('method', 'edit')}")
        require(not out.exists(), f"{out} already exists (it may be one of your LoRAs); choose another name.")
        meta = {"ws_host": self.backend.name}
        meta.update(extra_meta or {})
        flux = {}
        if edit.family == "flux":  # a T5 change goes into a T5 file beside the LoRA (docs/flux_lora.md)
            from ..core.flux_host import t5_base

            base, prefix = t5_base(self.backend.model())
            flux = {"t5_base": base, "t5_prefix": prefix}
        info = save_lora(
            edit, out, rank=int(rank) if rank else None, fmt=fmt, metadata=meta, **flux
        )  # siblings: the writer's rule
        self.backend.refresh_loras()
        return f"Saved LoRA {out} (rank {info.get('rank')}; {export_note(info)})."

    def save_checkpoint(self, edit: Edit, name: str) -> str:
        d = self.backend.checkpoint_dir()
        d.mkdir(parents=True, exist_ok=True)
        out = d / output_name(name, "weightsmith-edit")
        require(not out.exists(), f"{out} already exists; choose another name.")
        meta = {
            "ws_method": str(edit.report.get("method", "")),
            "ws_targets": json.dumps(edit.report.get("targets", [])),
        }
        path = self.backend.save_checkpoint(edit.deltas, out, meta)
        self.backend.refresh_checkpoints()
        return f"Saved checkpoint {path}; the checkpoint list was re-read (press its refresh button to see it)."


def _options(cls, values: dict):
    """Core options from the tab's values, strictly (core.optspec.from_values)."""
    from ..core.optspec import from_values

    return from_values(cls, values, where="Weightsmith tab")


# ----------------------------------------------------------------------------------------------
# report
def report_rows(edit: Edit, model) -> list[dict]:
    """The report rows (core.report.rows: ΔW against the model's weights, the solver's residuals
    for erasures and merges alike)."""
    from ..core import report

    return report.rows(edit, report.relative_changes(edit, model))


def layer_table(rows: list[dict]) -> list[list]:
    """Report rows as the tab's table (core.report.table, columns core.report.TABLE_HEADERS)."""
    from ..core import report

    return report.table(rows)


def picture(edit: Edit, rows: list[dict]):
    """The report picture (core.report.picture, the same one the ComfyUI nodes show)."""
    from ..core import report

    title = f"Weightsmith {(edit.report or {}).get('method', 'edit')}"
    return report.edit_picture(edit, rows, title)


def user_message(e: BaseException) -> str:
    if isinstance(e, CancelledError):
        return f"Stopped: {e}"
    if isinstance(e, WeightsmithError):
        return f"⚠ {e}"
    return f"⚠ unexpected error ({type(e).__name__}: {e}); see the console for details."
