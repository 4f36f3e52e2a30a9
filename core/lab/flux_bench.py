"""``weightsmith bench erase --family flux``: erasure on a random Flux.1-dev architecture (docs/flux.md,
"Erasure on Flux"; issue 33 item 7).

``--size full`` writes, once, into ``--workdir`` (kept and reused): T5-XXL (24 × 4096, 4.76 B parameters)
and CLIP-L at full size and a full-width transformer (1 double + 1 single block: erasure reads only
``txt_in`` and ``vector_in``, so the depth changes nothing measured), all bf16, with seeded random
weights at transformers' own initialisation scales; every tensor is generated and written one at a time.
``--size tiny`` uses the tests' tiny model (a smoke run). Each stage set's row is kept in the work folder
as it finishes (``erase_results_<size>_seed<seed>.json``), so a stopped run resumes; delete it to measure again.

Measured per stage set: time, peak RSS of the whole process, ‖Δ‖/‖W‖ of ``txt_in`` and of the T5
matrices, and the held-out residual at ``txt_in``'s output on complex prompts not used by the edit:
‖txt_in′(T5′(target)) − txt_in(T5(anchor))‖ / ‖txt_in(T5(target)) − txt_in(T5(anchor))‖ over the paired
T5 positions (1.0 = unedited). T5 runs layer by layer throughout (one float32 block at a time).
"""

from __future__ import annotations

import json
import zlib
from pathlib import Path

HELD_OUT = [
    "a cafe at night by {}, oil on canvas",
    "a river landscape in the style of {} with a bridge",
    "an old church painted by {} under a starry sky",
    "a portrait of a young woman by {} in a garden",
]
TARGETS, ANCHOR, PRESERVE = ["van gogh"], "art", ["picasso"]
T5_XXL = dict(vocab_size=32128, d_model=4096, d_kv=64, num_heads=64, d_ff=10240, num_layers=24)
CLIP_L_FULL = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12)


def _random(key: str, shape, std: float, seed: int, dtype):
    import torch

    g = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(key.encode()))
    return (torch.randn(shape, generator=g) * std).to(dtype)


def write_random_tensors(shapes: dict, std_of, path: Path, seed: int, dtype=None) -> None:
    """Seeded random tensors of ``shapes`` (``std_of(key, shape)``: a scale, ``"ones"`` or ``"zeros"``),
    generated and written one at a time in ``dtype`` (default bf16)."""
    import torch

    from ..safe_io import atomic_save_streamed

    dtype = dtype or torch.bfloat16

    def get(k):
        std = std_of(k, shapes[k])
        if std == "ones":
            return torch.ones(shapes[k], dtype=dtype)
        if std == "zeros":
            return torch.zeros(shapes[k], dtype=dtype)
        return _random(k, shapes[k], std, seed, dtype)

    atomic_save_streamed({k: (dtype, s) for k, s in shapes.items()}, get, path)


def transformer_std(k, shape):
    """The random transformer's scales: unit-variance outputs for unit-variance inputs."""
    if k.endswith("scale"):
        return "ones"
    return 0.02 if k.endswith("bias") else shape[1] ** -0.5


def meta_transformer(depth: int = 1, single: int = 1):
    """A full-width Flux.1-dev transformer on the meta device (no memory) at the given depth, and its
    tensor shapes under BFL names."""
    import torch
    from diffusers import FluxTransformer2DModel

    from .random_models import diffusers_to_bfl_state

    with torch.device("meta"):
        trm = FluxTransformer2DModel(num_layers=depth, num_single_layers=single, guidance_embeds=True)
    return trm, {k: tuple(v.shape) for k, v in diffusers_to_bfl_state(trm.state_dict(), trm.config).items()}


def in_workdir(args, run, prefix: str) -> int:
    """``run(args, folder)`` in ``--workdir`` (kept), or in a temporary folder removed at the end."""
    import shutil
    import tempfile

    temp = None if getattr(args, "workdir", None) else Path(tempfile.mkdtemp(prefix=prefix))
    try:
        return run(args, Path(args.workdir) if temp is None else temp)
    finally:
        if temp is not None:
            shutil.rmtree(temp, ignore_errors=True)


def write_full_random_flux(
    folder: Path, seed: int = 0, transformer: bool = True, t5_dtype=None
) -> tuple[Path, list[Path]]:
    """The full-size random Flux files (see the module docstring); written once, then reused.
    ``transformer=False``: the text encoders only (the merge bench writes its own transformer);
    ``t5_dtype``: T5's stored precision (default bf16; ``torch.float8_e4m3fn`` as ``t5xxl_fp8_e4m3fn``
    files are, without ComfyUI's scales)."""
    import torch
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    t5_name = "t5xxl_fp8_e4m3fn.safetensors" if t5_dtype == torch.float8_e4m3fn else "t5xxl_bf16.safetensors"
    tr, clip, t5 = folder / "flux1-dev.safetensors", folder / "clip_l.safetensors", folder / t5_name
    done = folder / "done.json"
    if done.is_file() and json.loads(done.read_text()).get("seed") == seed and t5.is_file():
        if transformer and not tr.is_file():  # the text encoders were written without it: add it
            write_random_tensors(meta_transformer(1, 1)[1], transformer_std, tr, seed + 2)
        return tr, [clip, t5]
    with torch.device("meta"):
        t5m = T5EncoderModel(T5Config(feed_forward_proj="gated-gelu", is_encoder_decoder=False, **T5_XXL))
        clipm = CLIPTextModel(CLIPTextConfig(vocab_size=49408, max_position_embeddings=77, **CLIP_L_FULL))
    d, kv, h, ff = T5_XXL["d_model"], T5_XXL["d_kv"], T5_XXL["num_heads"], T5_XXL["d_ff"]

    def t5_std(k, shape):  # transformers' T5 initialisation (factor 1)
        if "layer_norm" in k:
            return "ones"
        if k == "shared.weight":
            return 1.0
        if k.endswith("SelfAttention.q.weight"):
            return (d * kv) ** -0.5
        if k.endswith("SelfAttention.o.weight"):
            return (h * kv) ** -0.5
        if k.endswith("wo.weight"):
            return ff**-0.5
        return d**-0.5  # k, v, wi_0, wi_1, relative_attention_bias

    def clip_std(k, shape):
        if "layer_norm" in k:
            return "ones" if k.endswith("weight") else "zeros"
        if k.endswith("bias"):
            return "zeros"
        return 0.02

    t5_shapes = {k: tuple(v.shape) for k, v in t5m.state_dict().items() if k != "encoder.embed_tokens.weight"}
    clip_shapes = {
        ("text_model." + k if not k.startswith("text_model.") else k): tuple(v.shape)
        for k, v in clipm.state_dict().items()
        if not k.endswith("position_ids")
    }
    write_random_tensors(t5_shapes, t5_std, t5, seed, t5_dtype)
    write_random_tensors(clip_shapes, clip_std, clip, seed + 1)
    if transformer:
        write_random_tensors(meta_transformer(1, 1)[1], transformer_std, tr, seed + 2)
    done.write_text(json.dumps({"seed": seed}))
    return tr, [clip, t5]


def txt_in_residual(model, deltas: dict, held_t: list[str], held_a: list[str], original: dict | None = None) -> float:
    """The held-out residual at ``txt_in``'s output (module docstring); T5 edits applied block by block.
    ``original``: a dict that caches the unedited T5 outputs between calls."""
    import copy

    import torch

    from ..erase.flux import t5_pairs

    t5 = model.t5
    ids_t, ids_a = model.tokenize(held_t, "text_encoder_2"), model.tokenize(held_a, "text_encoder_2")
    cache = original if original is not None else {}
    if "t" not in cache:
        cache["t"], cache["a"] = t5.encode(ids_t), t5.encode(ids_a)
    by_block: dict[int, dict] = {}
    for n, d in deltas.items():
        if n.startswith("text_encoder_2.encoder.block."):
            parts = n.split(".")
            by_block.setdefault(int(parts[3]), {})[".".join(parts[4:])] = d
    if by_block:
        h, bias = t5.embed(ids_t), None
        for i in range(t5.n_layers):
            blk = t5.block(i)
            if i in by_block:
                blk = copy.deepcopy(blk)
                for path, d in by_block[i].items():
                    blk.get_submodule(path).weight.data += d.to(blk.get_submodule(path).weight.dtype)
            h, bias = t5.run_block(blk, h, bias)
            del blk
        xt = t5.final_norm(h)
    else:
        xt = cache["t"]
    W = model.weight("transformer.context_embedder").double()
    Wn = W + deltas["transformer.context_embedder"].double()
    num = den = 0.0
    with torch.no_grad():
        for b in range(len(held_t)):
            tp, ap = t5_pairs(ids_t[b], ids_a[b], "suffix", None)
            ya = cache["a"][b, list(ap)].double() @ W.T
            num += float(((xt[b, list(tp)].double() @ Wn.T - ya) ** 2).sum())
            den += float(((cache["t"][b, list(tp)].double() @ W.T - ya) ** 2).sum())
    return (num / den) ** 0.5 if den else 0.0


def run_flux(args) -> int:
    """The bench; without ``--workdir`` the model files go to a temporary folder removed at the end."""
    return in_workdir(args, _run_flux, "ws-flux-bench-")


def _run_flux(args, work: Path) -> int:
    from ..erase import EraseOptions, erase
    from ..flux_io import load_flux
    from ..memory import PeakRSS, rss
    from .random_models import build_random_flux, write_random_flux

    if args.size == "full":
        path, tes = write_full_random_flux(work, args.seed)
    else:
        path, tes = write_random_flux(build_random_flux(args.seed), work / "tiny", "bfl")
    model = load_flux(path, tes)
    held_t = [t.format(c) for c in TARGETS for t in HELD_OUT]
    held_a = [t.format(ANCHOR) for _ in TARGETS for t in HELD_OUT]
    n = model.t5.n_layers
    configs = [
        ("uce (txt_in, vector_in)", "uce", EraseOptions(expand_prompts=False, preserve_captions=False)),
        ("zero-residual (txt_in, vector_in)", "zero-residual", EraseOptions()),
        (f"erasepro T5 0-{n // 3 - 1} k,v", "erasepro", EraseOptions(te_layers=(0, n // 3 - 1))),
        (f"erasepro T5 0-{n - 1} k,v", "erasepro", EraseOptions()),
        # the same prompts as the uce row (no expansion, no preserve captions): the time ratio to our UCE
        (
            f"erasepro T5 0-{n - 1} k,v, uce's prompts",
            "erasepro",
            EraseOptions(expand_prompts=False, preserve_captions=False),
        ),
    ]
    res_path = work / f"erase_results_{args.size}_seed{args.seed}.json"  # rows kept: a stopped run resumes
    rows = json.loads(res_path.read_text()) if res_path.is_file() else {}
    original: dict = {}
    for label, method, opts in configs:
        if label in rows:
            continue
        with PeakRSS() as m:
            edit = erase(model, TARGETS, [ANCHOR], PRESERVE, method, opts)
        peak_total = m.peak
        t5_rel = [s["delta_rel"] for s in edit.report["stages"] if s["stage"].startswith("text_encoder_2")]
        ctx = next(s for s in edit.report["stages"] if s["stage"] == "txt_in")
        rows[label] = {
            "time_s": m.seconds,
            "peak_rss_gib": peak_total / 2**30,
            "txt_in_delta_rel": ctx["delta_rel"],
            "t5_delta_rel_mean": sum(t5_rel) / len(t5_rel) if t5_rel else 0.0,
            "held_out_residual": txt_in_residual(model, edit.deltas, held_t, held_a, original),
        }
        res_path.write_text(json.dumps(rows, indent=1))
    result = {
        "model": f"flux random, size={args.size}, seed={args.seed}, files in {work}",
        "targets": TARGETS,
        "anchor": ANCHOR,
        "preserve": PRESERVE,
        "held_out_templates": HELD_OUT,
        "rows": rows,
        "peak_rss_gib_at_end": rss() / 2**30,
        "goals": {"peak_rss_gib_max": 12, "erasepro_vs_our_uce_max": 3.0},
    }
    uce, same = rows.get(configs[0][0]), rows.get(configs[-1][0])
    if uce and same:  # the same prompts: what the method itself costs beside UCE
        result["erasepro_vs_our_uce"] = same["time_s"] / uce["time_s"]
    result["peak_rss_gib_max"] = max(r["peak_rss_gib"] for r in rows.values())
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"Flux erasure benchmark on {result['model']}")
        print(f"{'stage set':<46}{'time s':>9}{'peak GiB':>10}{'‖Δ‖/‖W‖ txt_in':>16}{'T5 mean':>9}{'held-out':>10}")
        for k, r in rows.items():
            print(
                f"{k:<46}{r['time_s']:>9.1f}{r['peak_rss_gib']:>10.2f}{r['txt_in_delta_rel']:>16.4f}"
                f"{r['t5_delta_rel_mean']:>9.4f}{r['held_out_residual']:>10.4f}"
            )
        if "erasepro_vs_our_uce" in result:
            print(f"erasepro / uce time on the same prompts: {result['erasepro_vs_our_uce']:.1f}× (goal ≤ 3×)")
        print(f"largest peak RSS: {result['peak_rss_gib_max']:.2f} GiB (goal ≤ 12 GB)")
        print("held-out: ‖txt_in′(T5′(target)) − txt_in(T5(anchor))‖ / the same unedited, on 4 complex prompts not")
        print("used by the edit (1 = unchanged, 0 = the target reads as the anchor)")
    return 0
