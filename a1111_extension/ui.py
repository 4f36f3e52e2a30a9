"""The Weightsmith tab: two sub-tabs (Erase, Merge LoRAs) built from plain Gradio components.

``build_ui(backend)`` returns a ``gr.Blocks``; A1111/Forge put it in a tab (``scripts/
weightsmith_tab.py``), and ``python -m weightsmith.a1111_extension.standalone MODEL`` serves it on
its own. Written for gradio 3.41 (A1111 v1.10) and gradio 4 (Forge): only components and
arguments both versions have.
"""

from __future__ import annotations

import traceback
from types import SimpleNamespace

from ..core.blockweights import BLOCKS_HELP, NO_PRESET, PRESET_CHOICES
from ..core.erase.options import TE_SUBLAYERS, EraseOptions
from ..core.merge.options import MergeOptions, host_default, machine_is_cpu
from ..core.optspec import spec
from ..core.report import TABLE_HEADERS
from .backend import ERASE_METHODS, Workbench, merge_methods, user_message

E = lambda name: spec(EraseOptions, name)  # noqa: E731  defaults, labels and help: declared once in core
M = lambda name: spec(MergeOptions, name)  # noqa: E731
CPU = machine_is_cpu()  # the merge widgets start from the quick settings there


def MD(name: str):
    """The default the tab shows for merge option ``name`` (core.merge.options.host_default)."""
    return host_default(name, CPU)


def _layer_range(text: str):
    from ..core.optspec import parse_layer_range

    return parse_layer_range(text)


def _short(label: str, n: int = 90) -> str:
    """A progress label that fits the bar, keeping its end (core puts the time left there)."""
    return label if len(label) <= n else label[: n // 2 - 1] + "…" + label[-(n - n // 2) :]


def _float(x, default=None):
    try:
        return default if x is None or x == "" else float(x)
    except (TypeError, ValueError):
        return default


def _rounds(x):
    """A slider's count (gradio gives 1.0) as an int; anything else goes on to core's check unchanged."""
    if x is None or x == "":
        return None  # the declared default
    v = _float(x)
    return x if v is None else int(v) if v.is_integer() else v


def _erase_tab(gr, backend):
    """The Erase sub-tab's components (defaults and labels from core's option declarations)."""
    with gr.Tab("Erase"):
        with gr.Row():
            targets = gr.Textbox(
                label='Targets (concepts to erase; one per line, or separated by , or ; — "Smith, John" in quotes)',
                lines=2,
                placeholder="Van Gogh",
                elem_id="weightsmith_targets",
            )
            anchors = gr.Textbox(
                label="Anchors (what each target becomes; one, or one per target)",
                lines=2,
                placeholder="art",
                elem_id="weightsmith_anchors",
            )
            preserve = gr.Textbox(
                label="Preserve (concepts that must not change)",
                lines=2,
                placeholder="Monet, Picasso",
                elem_id="weightsmith_preserve",
            )
        with gr.Row():
            method = gr.Radio(list(ERASE_METHODS), value=ERASE_METHODS[0], label="Method")
            strength = gr.Slider(0.0, 2.0, value=1.0, step=0.05, label="Apply strength")
        with gr.Accordion("Advanced options", open=False):
            with gr.Row():
                tokens = gr.Radio(list(E("tokens").choices), value=E("tokens").default, label=E("tokens").label)
                te_sub = gr.CheckboxGroup(
                    list(TE_SUBLAYERS), value=list(E("te_sublayers").default), label=E("te_sublayers").label
                )
                te_layers = gr.Textbox(label=E("te_layers").label, value="")
            with gr.Row():
                expand = gr.Radio(["auto", "on", "off"], value="auto", label="Expand prompts with templates")
                lam = gr.Number(value=E("lam").default, label=E("lam").label)
                eta_p = gr.Number(value=E("eta_preserve").default, label=E("eta_preserve").label)
                rcond = gr.Number(value=E("rcond").default, label=E("rcond").label)
                rounds = gr.Slider(
                    E("harden_rounds").lo,
                    E("harden_rounds").hi,
                    value=E("harden_rounds").default,
                    step=E("harden_rounds").step,
                    label=E("harden_rounds").label,
                )
        with gr.Row():
            b_apply = gr.Button("Apply", variant="primary", elem_id="weightsmith_apply", interactive=backend.can_apply)
            b_undo = gr.Button("Undo", elem_id="weightsmith_undo", interactive=backend.can_apply)
            b_stop = gr.Button("Interrupt", elem_id="weightsmith_interrupt")
        with gr.Row():
            ckpt_name = gr.Textbox(label="Checkpoint name", value="", placeholder="my-model-erased")
            b_ckpt = gr.Button("Save as checkpoint", elem_id="weightsmith_save_ckpt")
            lora_name = gr.Textbox(label="LoRA name", value="", placeholder="erase-van-gogh")
            rank = gr.Number(value=0, label="LoRA rank (0: exact)")
            fmt = gr.Radio(["lora", "diff"], value="lora", label="LoRA format")
            b_lora = gr.Button("Save as LoRA", elem_id="weightsmith_save_lora")
    return SimpleNamespace(
        targets=targets,
        anchors=anchors,
        preserve=preserve,
        method=method,
        strength=strength,
        tokens=tokens,
        te_sub=te_sub,
        te_layers=te_layers,
        expand=expand,
        lam=lam,
        eta_p=eta_p,
        rcond=rcond,
        rounds=rounds,
        b_apply=b_apply,
        b_undo=b_undo,
        b_stop=b_stop,
        ckpt_name=ckpt_name,
        b_ckpt=b_ckpt,
        lora_name=lora_name,
        rank=rank,
        fmt=fmt,
        b_lora=b_lora,
    )


def _merge_tab(gr, backend):
    """The Merge LoRAs sub-tab's components."""
    with gr.Tab("Merge LoRAs"):
        with gr.Row():
            loras = gr.Dropdown(
                backend.list_loras(),
                multiselect=True,
                label="LoRAs (from the LoRA folder)",
                elem_id="weightsmith_loras",
            )
            b_refresh = gr.Button("Refresh list")
        with gr.Row():
            weights = gr.Textbox(label="Weights (one per LoRA, comma-separated; empty: 1 each)", value="")
            prompts = gr.Textbox(
                label="Sample prompts (one line per LoRA, several separated by ; or |; "
                "empty: from each LoRA's training tags)",
                lines=2,
                value="",
            )
        with gr.Row():
            blocks = gr.Textbox(
                label="Block weights (one line per LoRA, or one for all; empty: none)",
                lines=2,
                value="",
                info=BLOCKS_HELP,
                elem_id="weightsmith_blocks",
            )
            block_preset = gr.Dropdown(list(PRESET_CHOICES), value=NO_PRESET, label="Add a preset line")
        with gr.Row():
            m_method = gr.Dropdown(list(merge_methods()), value=merge_methods()[0], label="Method")
            iterations = gr.Number(
                value=MD("iterations"), label=M("iterations").label, precision=0, info=M("iterations").help
            )
            samples = gr.Number(value=MD("samples"), label=M("samples").label, precision=0, info=M("samples").help)
            steps = gr.Number(value=MD("steps"), label=M("steps").label, precision=0, info=M("steps").help)
            seed = gr.Number(value=M("seed").default, label=M("seed").label, precision=0)
        with gr.Accordion("Advanced", open=False):
            max_memory = gr.Number(
                value=M("max_memory_gb").default, label=M("max_memory_gb").label, info=M("max_memory_gb").help
            )
            ridge_toward = gr.Dropdown(
                list(M("ridge_toward").choices),
                value=M("ridge_toward").default,
                label=M("ridge_toward").label,
                info=M("ridge_toward").help,
            )
        with gr.Row():
            m_name = gr.Textbox(label="Output LoRA name", value="", placeholder="merged")
            m_rank = gr.Number(value=0, label="Rank (0: exact)", precision=0)
            m_apply = gr.Checkbox(value=False, label="Also apply to the loaded model", interactive=backend.can_apply)
            b_merge = gr.Button("Merge → Save as LoRA", variant="primary", elem_id="weightsmith_merge")
            b_stop2 = gr.Button("Interrupt")
    return SimpleNamespace(
        loras=loras,
        b_refresh=b_refresh,
        weights=weights,
        prompts=prompts,
        m_method=m_method,
        iterations=iterations,
        samples=samples,
        steps=steps,
        seed=seed,
        max_memory=max_memory,
        ridge_toward=ridge_toward,
        m_name=m_name,
        m_rank=m_rank,
        m_apply=m_apply,
        b_merge=b_merge,
        b_stop2=b_stop2,
        blocks=blocks,
        block_preset=block_preset,
    )


def build_ui(backend, *, workbench: Workbench | None = None):
    """A ``gr.Blocks`` with the Erase and Merge LoRAs sub-tabs, bound to ``backend``."""
    import gradio as gr

    wb = workbench or Workbench(backend)

    def gr_progress(progress):
        def cb(done, total, label=""):
            try:
                progress(done / max(1, total), desc=_short(str(label)))
            except Exception:
                pass

        return cb

    def run(fn, progress):
        """Run an action; return (status, rows, figure, state)."""
        try:
            with wb.lock, wb.observing(gr_progress(progress)):
                msg, edit = fn()
                rows, pic = wb.report_for(edit) if edit is not None else ([], None)
            return msg, rows or None, pic if rows else None, wb.state_text(), model_text()
        except BaseException as e:  # noqa: BLE001  (everything becomes a message in the tab)
            if not isinstance(e, Exception):
                raise
            from ..core.errors import WeightsmithError

            if not isinstance(e, WeightsmithError):
                traceback.print_exc()
            return user_message(e), None, None, wb.state_text(), model_text()
        finally:
            idle = getattr(backend, "idle", None)
            if idle is not None:
                idle()

    # -- erase actions ------------------------------------------------------------------------
    def erase_args(targets, anchors, preserve, method, tokens, te_sub, te_layers, expand, lam, eta_p, rcond, rounds):
        adv = {
            "tokens": tokens,
            "te_sublayers": tuple(te_sub or E("te_sublayers").default),
            "te_layers": _layer_range(te_layers),
            "expand_prompts": None if expand == "auto" else expand == "on",
            "lam": _float(lam),
            "eta_preserve": _float(eta_p),
            "rcond": _float(rcond),
            "harden_rounds": _rounds(rounds),
        }
        return targets, anchors, preserve, method, adv

    def on_apply(
        targets,
        anchors,
        preserve,
        method,
        tokens,
        te_sub,
        te_layers,
        expand,
        lam,
        eta_p,
        rcond,
        rounds,
        strength,
        progress=gr.Progress(),  # noqa: B008  (gradio injects a progress tracker through this default)
    ):
        def fn():
            a = erase_args(
                targets, anchors, preserve, method, tokens, te_sub, te_layers, expand, lam, eta_p, rcond, rounds
            )
            edit = wb.compute_erase(*a)
            msg = wb.apply(edit, _float(strength, 1.0))
            return f"{msg} ({edit.report.get('time_s', 0):.1f} s)", edit

        return run(fn, progress)

    def on_undo(progress=gr.Progress()):  # noqa: B008  (gradio injects a progress tracker through this default)
        return run(lambda: (wb.undo(), None), progress)

    def on_save_lora(
        targets,
        anchors,
        preserve,
        method,
        tokens,
        te_sub,
        te_layers,
        expand,
        lam,
        eta_p,
        rcond,
        rounds,
        name,
        rank,
        fmt,
        progress=gr.Progress(),  # noqa: B008  (gradio injects a progress tracker through this default)
    ):
        def fn():
            a = erase_args(
                targets, anchors, preserve, method, tokens, te_sub, te_layers, expand, lam, eta_p, rcond, rounds
            )
            edit, which = wb.edit_to_save(lambda: wb.compute_erase(*a))
            return f"{wb.save_lora(edit, name, int(_float(rank, 0)) or None, fmt)} Saved {which}.", edit

        return run(fn, progress)

    def on_save_ckpt(
        targets,
        anchors,
        preserve,
        method,
        tokens,
        te_sub,
        te_layers,
        expand,
        lam,
        eta_p,
        rcond,
        rounds,
        name,
        progress=gr.Progress(),  # noqa: B008  (gradio injects a progress tracker through this default)
    ):
        def fn():
            a = erase_args(
                targets, anchors, preserve, method, tokens, te_sub, te_layers, expand, lam, eta_p, rcond, rounds
            )
            edit, which = wb.edit_to_save(lambda: wb.compute_erase(*a))
            return f"{wb.save_checkpoint(edit, name)} Saved {which}.", edit

        return run(fn, progress)

    # -- merge actions ------------------------------------------------------------------------
    def on_merge(
        loras,
        weights,
        prompts,
        method,
        iterations,
        samples,
        steps,
        seed,
        name,
        rank,
        apply_too,
        max_memory=None,
        ridge_toward=None,
        blocks=None,
        progress=gr.Progress(),  # noqa: B008  (gradio injects a progress tracker through this default)
    ):
        def fn():
            settings = {
                k: int(_float(v, MD(k)))
                for k, v in (("iterations", iterations), ("samples", samples), ("steps", steps), ("seed", seed))
            }
            settings["max_memory_gb"] = _float(max_memory, M("max_memory_gb").default)
            settings["ridge_toward"] = ridge_toward or M("ridge_toward").default
            edit, objs = wb.compute_merge(loras, weights, prompts, method, settings, blocks)
            from ..core.blockweights import file_metadata

            meta = {"ws_inputs": ",".join(l.name for l in objs), **file_metadata(edit.report)}
            try:
                import json

                from ..core.merge import merged_tag_frequency

                tf = merged_tag_frequency(objs)
                if tf:
                    meta["ss_tag_frequency"] = json.dumps(tf)
            except Exception:
                pass
            msg = wb.save_lora(edit, name or f"ws-merge-{method}", int(_float(rank, 0)) or None, "lora", meta)
            if edit.report.get("time_s") is not None:
                from ..core.progress import format_duration

                msg += f" Merge took {format_duration(edit.report['time_s'])}."
            from ..core.report import block_lines

            msg += "".join(f" {ln}." for ln in block_lines(edit.report))
            if apply_too:
                msg += " " + wb.apply(edit)
            return msg, edit

        return run(fn, progress)

    def on_refresh():
        backend.refresh_loras()
        return gr.update(choices=backend.list_loras())

    def on_interrupt():
        backend.interrupt()
        return "Interrupt requested; the job stops at its next step."

    def describe():
        try:
            return backend.describe()
        except Exception as e:  # noqa: BLE001
            return user_message(e)

    note = "" if backend.can_apply else f"\n\n**Save-only here:** {backend.apply_note}"

    def model_text():
        return f"Model: {describe()}{note}"

    with gr.Blocks(analytics_enabled=False) as demo:
        gr.Markdown("### Weightsmith: closed-form concept erasure and LoRA merging")
        model_info = gr.Markdown(model_text(), elem_id="weightsmith_model_info")
        er = _erase_tab(gr, backend)
        mg = _merge_tab(gr, backend)
        status = gr.Textbox(label="Status", interactive=False, elem_id="weightsmith_status")
        state = gr.Textbox(label="In memory", value=wb.state_text(), interactive=False, elem_id="weightsmith_state")
        table = gr.Dataframe(
            headers=TABLE_HEADERS, label="Per-layer changes", interactive=False, elem_id="weightsmith_table"
        )
        figure = gr.Image(
            label="Per-layer changes (the picture ComfyUI's report_image shows)",
            type="pil",
            interactive=False,
            elem_id="weightsmith_plot",
        )

        # the tab's endpoints, for scripts (gradio_client ``api_name="/weightsmith_apply"``, …): prefixed,
        # because gradio 4 names every unnamed event after its function and renames a later duplicate
        # (Forge's checkpoint merger has a ``save_checkpoint``, which "/save_checkpoint" reached)
        def api(name):
            return f"weightsmith_{name}"

        common = [
            er.targets,
            er.anchors,
            er.preserve,
            er.method,
            er.tokens,
            er.te_sub,
            er.te_layers,
            er.expand,
            er.lam,
            er.eta_p,
            er.rcond,
            er.rounds,
        ]
        outs = [status, table, figure, state, model_info]
        e1 = er.b_apply.click(on_apply, common + [er.strength], outs, api_name=api("apply"))
        e2 = er.b_undo.click(on_undo, [], outs, api_name=api("undo"))
        e3 = er.b_lora.click(on_save_lora, common + [er.lora_name, er.rank, er.fmt], outs, api_name=api("save_lora"))
        e4 = er.b_ckpt.click(on_save_ckpt, common + [er.ckpt_name], outs, api_name=api("save_checkpoint"))
        e5 = mg.b_merge.click(
            on_merge,
            [
                mg.loras,
                mg.weights,
                mg.prompts,
                mg.m_method,
                mg.iterations,
                mg.samples,
                mg.steps,
                mg.seed,
                mg.m_name,
                mg.m_rank,
                mg.m_apply,
                mg.max_memory,
                mg.ridge_toward,
                mg.blocks,
            ],
            outs,
            api_name=api("merge"),
        )
        mg.block_preset.change(
            lambda p, t: t if p == NO_PRESET else ((t.rstrip() + "\n") if (t or "").strip() else "") + p,
            [mg.block_preset, mg.blocks],
            [mg.blocks],
        )
        er.b_stop.click(on_interrupt, [], [status], api_name=api("interrupt"), queue=False)
        mg.b_stop2.click(on_interrupt, [], [status], queue=False)
        mg.b_refresh.click(on_refresh, [], [mg.loras], api_name=api("refresh_loras"))
        demo.load(lambda: (model_text(), wb.state_text()), [], [model_info, state])
        _ = (e1, e2, e3, e4, e5)
    demo.weightsmith_workbench = wb
    return demo
