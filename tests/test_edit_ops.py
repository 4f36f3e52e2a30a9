"""Edit composition and device moves (core/edit.py: ``Edit.then``, ``Edit.to``), the hosts' one
"refused N of M weights" check (``check_patches_accepted``), and the host names that live in core only
(core/naming.py). Each result is compared with a computation written out here."""

import pytest
import torch

from weightsmith.core.edit import Edit, FactorDeltas, check_patches_accepted
from weightsmith.core.errors import WeightsmithError

CFG = {"down_block_types": ["CrossAttnDownBlock2D"], "up_block_types": ["CrossAttnUpBlock2D"]}


def _factored(seed, names, shape=(6, 5), rank=2):
    g = torch.Generator().manual_seed(seed)
    factors = {n: (torch.randn(shape[0], rank, generator=g), torch.randn(rank, shape[1], generator=g)) for n in names}
    return factors, {n: u @ d for n, (u, d) in factors.items()}


def _snapshot(edit):
    return (
        {k: v.clone() for k, v in edit.deltas.items()},
        {k: (u.clone(), d.clone()) for k, (u, d) in edit.factors.items()},
        dict(edit.report),
        dict(edit.sources),
    )


def _same(edit, snap):
    deltas, factors, report, sources = snap
    return (
        set(edit.deltas) == set(deltas)
        and all(torch.equal(edit.deltas[k], deltas[k]) for k in deltas)
        and set(edit.factors) == set(factors)
        and all(torch.equal(edit.factors[k][i], factors[k][i]) for k in factors for i in (0, 1))
        and edit.report == report
        and edit.sources == sources
    )


def test_then_adds_deltas_concatenates_shared_factors_and_changes_neither_edit():
    fa, da = _factored(1, ["both", "only_a", "a_factored_b_dense"])
    fb, db = _factored(2, ["both", "only_b"])
    dense_b = torch.randn(6, 5, generator=torch.Generator().manual_seed(3))
    a = Edit("sd1", CFG, dict(da), dict(fa), {"method": "uce", "combined_with": ["linear"]}, {"x": "a.safetensors"})
    b = Edit("sd1", CFG, {**db, "a_factored_b_dense": dense_b}, dict(fb), {"method": "iteris"}, {"y": "b.safetensors"})
    sa, sb = _snapshot(a), _snapshot(b)

    c = a.then(b)

    assert _same(a, sa) and _same(b, sb) and c is not a and c is not b
    expect = {
        "both": da["both"] + db["both"],
        "only_a": da["only_a"],
        "only_b": db["only_b"],
        "a_factored_b_dense": da["a_factored_b_dense"] + dense_b,
    }
    assert set(c.deltas) == set(expect)
    for k, v in expect.items():
        assert torch.allclose(c.deltas[k], v, atol=1e-6), k
    # exact factors stay exact where both had them: [u_a u_b] @ [d_a; d_b] = ΔW_a + ΔW_b
    assert set(c.factors) == {"both", "only_a", "only_b"}
    for k in c.factors:
        u, d = c.factors[k]
        assert torch.allclose(u @ d, expect[k], atol=1e-5), k
    assert c.factors["both"][0].shape == (6, 4)
    assert c.report == {"method": "iteris", "combined_with": ["uce", "linear"]}
    assert c.sources == {"x": "a.safetensors", "y": "b.safetensors"}
    # three in a row: the sum of the three, and the methods in order, most recent first
    z = Edit("sd1", CFG, {"only_a": torch.ones(6, 5)}, {}, {"method": "erasepro"})
    abz = c.then(z)
    assert torch.allclose(abz.deltas["only_a"], da["only_a"] + 1, atol=1e-6)
    assert "only_a" not in abz.factors and abz.report["combined_with"] == ["iteris", "uce", "linear"]


def test_then_takes_family_and_config_from_the_later_edit():
    a = Edit("sd1", {"a": 1}, {"m": torch.zeros(2, 2)}, {}, {"method": "uce"})
    b = Edit("sd1", {"b": 2}, {"m": torch.ones(2, 2)}, {}, {"method": "uce"})
    c = a.then(b)
    assert c.unet_config == {"b": 2} and c.family == "sd1"


def test_to_moves_and_casts_a_new_edit_and_leaves_the_original_as_it_was():
    f, d = _factored(4, ["m1", "m2"])
    dense = {"m1": d["m1"].double(), "m2": d["m2"].double().requires_grad_()}
    e = Edit("sd2", CFG, dense, {k: (u.double(), w.double()) for k, (u, w) in f.items()}, {"method": "x"}, {"s": "p"})
    snap = _snapshot(e)

    moved = e.to("cpu", torch.float32)

    assert moved is not e and moved.deltas is not e.deltas and moved.report is not e.report
    assert _same(e, snap) and e.deltas["m1"].dtype == torch.float64 and e.deltas["m2"].requires_grad
    for k in dense:
        assert moved.deltas[k].dtype == torch.float32 and not moved.deltas[k].requires_grad
        assert torch.equal(moved.deltas[k], dense[k].detach().float())
        assert torch.equal(moved.factors[k][0], f[k][0].double().float())
    assert (moved.family, moved.unet_config, moved.report, moved.sources) == ("sd2", CFG, {"method": "x"}, {"s": "p"})
    moved.report["strength"] = 2.0
    assert "strength" not in e.report
    # dtype None keeps the precision
    assert e.to("cpu").deltas["m1"].dtype == torch.float64


def test_to_keeps_exact_factor_deltas_formed_when_read():
    f, d = _factored(5, ["a", "b"], shape=(4, 3))
    e = Edit(
        "sd1",
        CFG,
        FactorDeltas({k: (u.double(), w.double()) for k, (u, w) in f.items()}, {"a": (4, 3), "b": (2, 6)}),
        {k: (u.double(), w.double()) for k, (u, w) in f.items()},
    )
    moved = e.to("cpu", torch.float32)
    assert isinstance(moved.deltas, FactorDeltas) and isinstance(e.deltas, FactorDeltas)
    assert moved.deltas["b"].shape == (2, 6) and moved.deltas["b"].dtype == torch.float32
    assert torch.allclose(moved.deltas["a"], d["a"], atol=1e-6)
    assert e.factors["a"][0].dtype == torch.float64


def test_the_refused_weights_check_names_counts_first_key_and_fix():
    wanted = {"k.c": 1, "k.a": 2, "k.b": 3}
    check_patches_accepted(wanted, ["k.a", "k.b", "k.c"], "Forge", "UNet")  # all accepted: nothing
    check_patches_accepted(wanted, ("k.a", "k.b", "k.c", "extra"), "ComfyUI", "MODEL")
    with pytest.raises(WeightsmithError) as e:
        check_patches_accepted(wanted, ["k.b"], "Forge", "text encoder")
    msg = str(e.value)
    assert msg.startswith("Forge did not accept 2 of 3 text encoder weights (first: k.a)")
    assert "computed for another model" in msg and "Nothing was changed" in msg
    with pytest.raises(WeightsmithError, match=r"ComfyUI did not accept 3 of 3 MODEL weights .*connect the MODEL"):
        check_patches_accepted(wanted, [], "ComfyUI", "MODEL", fix="connect the MODEL and CLIP it was computed from")


def test_host_prefixes_and_family_labels_are_cores():
    """The adapters take these names from core/naming.py (one definition, not a copy)."""
    from weightsmith.a1111_extension import a1111
    from weightsmith.core import naming
    from weightsmith.nodes import comfy_adapter

    assert a1111.UNET_PREFIX is naming.LDM_UNET_PREFIX
    assert comfy_adapter.UNET_PREFIX is naming.COMFY_UNET_PREFIX and comfy_adapter.TE_PREFIXES is naming.COMFY_TE_ATTRS
    assert [naming.family_label(f) for f in ("sd1", "sd2", "sdxl", "flux")] == ["SD1.x", "SD2.x", "SDXL", "Flux.1"]
    assert naming.SUPPORTED_FAMILIES == "{sd1}, {sd2}, {sdxl} and {flux}".format(**naming.FAMILY_LABELS)
    # the key prefixes each host's text encoders live under (ComfyUI's state dict, LDM checkpoints)
    assert {f: {c: naming.comfy_te_prefix(f, c) for c in naming.COMFY_TE_ATTRS[f]} for f in naming.COMFY_TE_ATTRS} == {
        "sd1": {"text_encoder": "clip_l.transformer."},
        "sd2": {"text_encoder": "clip_h.transformer."},
        "sdxl": {"text_encoder": "clip_l.transformer.", "text_encoder_2": "clip_g.transformer."},
        "flux": {"text_encoder": "clip_l.transformer.", "text_encoder_2": "t5xxl.transformer."},
    }
    assert naming.te_checkpoint_prefix("sdxl", naming.TE2) == ("conditioner.embedders.1.model.", True)
    assert naming.sdxl_embedder_prefix(0, open_clip=False) == "conditioner.embedders.0.transformer."
