"""Bad inputs (model, LoRA, tokenizer, metadata) get one WeightsmithError naming the problem, before
any work where possible; docs/reliability.md, "Inputs"."""

import os
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from weightsmith.core.cli import main
from weightsmith.core.errors import WeightsmithError
from weightsmith.core.lab.random_loras import random_lora

sys.path.insert(0, str(Path(__file__).parent))
from ws_sockets import unix_socket_at  # noqa: E402


def test_alpha_zero_is_read_as_rank_and_said(tiny_models, tmp_path):
    from weightsmith.core.lora_read import load_lora

    m = tiny_models["sd1"]
    t, _ = random_lora(m, groups=("attn",), rank=2, seed=1)
    for k in [k for k in t if k.endswith(".alpha")]:
        t[k] = torch.tensor(0.0)
    save_file(t, str(tmp_path / "a0.safetensors"))
    l = load_lora(tmp_path / "a0.safetensors", m)
    k = next(k for k in sorted(t) if k.endswith(".lora_up.weight"))
    p = k[: -len(".lora_up.weight")]
    mod = next(mm for mm in l.modules.values())
    assert all(mm.scale == 1.0 for mm in l.modules.values())
    up, down = t[p + ".lora_up.weight"].double(), t[p + ".lora_down.weight"].double()
    name = next(n for n, mm in l.modules.items() if torch.equal(mm.up, t[p + ".lora_up.weight"]))
    torch.testing.assert_close(l.modules[name].delta().double(), (up @ down).reshape(l.modules[name].shape))
    assert mod.alpha == 0.0
    assert l.notes and "alpha = rank" in l.notes[0] and "kohya" in l.notes[0]


@pytest.mark.parametrize("command", ["erase", "merge"])
def test_a_missing_tokenizer_folder_is_refused(cli_cases, command, tiny_checkpoints, lora_files, tmp_path, capsys):
    missing = tmp_path / "no-such-tokenizer"
    out = tmp_path / "o.safetensors"
    argv = (
        cli_cases.erase(tiny_checkpoints["sd1"], missing, out, "--format", "lora")
        if command == "erase"
        else cli_cases.merge(tiny_checkpoints["sd1"], missing, lora_files, out)
    )
    cli_cases.fails(capsys, argv, "--tokenizer", "does not exist")


# ----------------------------------------------------------------------------------------------
# --tokenizer (issue 37): used as given or refused with the reason, never silently replaced
def _json_only_tokenizer(src, dst):
    """``src``'s tokenizer saved as transformers 5 does: tokenizer.json (+ config), no vocab.json."""
    from transformers import CLIPTokenizerFast

    tok = CLIPTokenizerFast.from_pretrained(str(src), local_files_only=True)
    tok.save_pretrained(str(dst))
    for p in dst.iterdir():
        if p.name not in ("tokenizer.json", "tokenizer_config.json"):
            p.unlink()
    return dst


def test_a_tokenizer_json_only_folder_is_used_and_gives_the_same_edit(
    cli_cases, tiny_checkpoints, tokenizer_dir, tmp_path
):
    tj = _json_only_tokenizer(tokenizer_dir, tmp_path / "tokenizer")
    assert sorted(p.name for p in tj.iterdir()) == ["tokenizer.json", "tokenizer_config.json"]
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    assert main(cli_cases.erase(tiny_checkpoints["sd1"], tokenizer_dir, a, "--format", "lora")) == 0
    assert main(cli_cases.erase(tiny_checkpoints["sd1"], tj, b, "--format", "lora")) == 0
    ta, tb = load_file(str(a)), load_file(str(b))
    assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)
    # and it is not the bundled CLIP vocabulary: the word tokenizer makes "van" one token
    from weightsmith.core.tokenizer import find_clip_tokenizer

    assert find_clip_tokenizer(tj)("van gogh").input_ids == find_clip_tokenizer(tokenizer_dir)("van gogh").input_ids


@pytest.mark.parametrize(
    "case,words",
    [
        ("file", ("--tokenizer", "is a file, not a folder")),
        ("empty", ("--tokenizer", "holds no CLIP tokenizer", "lacks vocab.json and merges.txt", "contains nothing")),
        ("only_config", ("lacks vocab.json and merges.txt", "tokenizer_config.json")),
        ("broken_vocab", ("--tokenizer", "damaged")),
        ("broken_tokenizer_json", ("--tokenizer", "damaged")),
    ],
)
def test_an_unusable_tokenizer_folder_is_refused_naming_what_it_lacks(
    case, words, cli_cases, tiny_checkpoints, tokenizer_dir, tmp_path, capsys
):
    import shutil

    bad = tmp_path / "tok"
    if case == "file":
        bad.write_text("not a folder")
    elif case == "broken_tokenizer_json":
        _json_only_tokenizer(tokenizer_dir, bad)
        (bad / "tokenizer.json").write_text('{"model": {"type": "BPE", "vocab": ')
    else:
        bad.mkdir()
        if case == "only_config":
            shutil.copy(tokenizer_dir / "tokenizer_config.json", bad)
        if case == "broken_vocab":
            for f in ("vocab.json", "merges.txt", "tokenizer_config.json"):
                shutil.copy(tokenizer_dir / f, bad)
            (bad / "vocab.json").write_text('{"a": 1, "b": ')
    out = tmp_path / "o.safetensors"
    err = cli_cases.fails(
        capsys, cli_cases.erase(tiny_checkpoints["sd1"], bad, out, "--format", "lora"), *words, str(bad)
    )
    assert "pass --tokenizer" not in err.lower() or case == "file"  # not a request for what was given
    assert not out.exists()


# ----------------------------------------------------------------------------------------------
# damaged checkpoints (issue 37): file surgery on a random model's checkpoint, one sentence each
def test_a_missing_or_misshapen_unet_weight_is_named_when_the_unet_loads(tiny_checkpoints, tokenizer_dir, tmp_path):
    """(An erase that reads only cross-attention weights does not need the others: its result is correct.)"""
    from weightsmith.core.model_io import load_model

    for case, words in (
        ("missing_unet_key", "lacks the UNet weight for down_blocks.0.resnets.0.conv1.weight"),
        ("wrong_shape_unet", "has shape (2, 2)"),
    ):
        bad = tmp_path / f"{case}.safetensors"
        _surgery(tiny_checkpoints["sd1"], bad, case)
        m = load_model(bad, tokenizer=tokenizer_dir)
        with pytest.raises(WeightsmithError) as e:
            _ = m.unet
        assert words in str(e.value) and "damaged" in str(e.value)


def _surgery(src, dst, case):
    import json

    from weightsmith.core.state_files import StateFile

    sd, meta = load_file(str(src)), dict(StateFile(src).metadata)
    k_to_k = next(k for k in sorted(sd) if k.endswith("attn2.to_k.weight"))
    k_unet = next(k for k in sorted(sd) if k.endswith("input_blocks.1.0.in_layers.2.weight"))
    if case == "unet_config_not_json":
        meta["ws_unet_config"] = "{not json"
    elif case == "unet_config_a_list":
        meta["ws_unet_config"] = "[1, 2]"
    elif case == "unet_config_contradicts":
        cfg = json.loads(meta["ws_unet_config"])
        meta["ws_unet_config"] = json.dumps({**cfg, "cross_attention_dim": 999})
    elif case == "heads_not_json":
        meta["ws_text_encoder_heads"] = "{{"
    elif case == "heads_not_dividing":
        meta["ws_text_encoder_heads"] = json.dumps({"text_encoder": 7})
    elif case == "heads_negative":
        meta["ws_text_encoder_heads"] = json.dumps({"text_encoder": -2})
    elif case == "wrong_shape_to_k":
        sd[k_to_k] = torch.zeros(3, 3)
    elif case == "wrong_shape_te":
        k = next(k for k in sorted(sd) if "layers.0.self_attn.q_proj.weight" in k)
        sd[k] = torch.zeros(5, 5)
    elif case == "missing_unet_key":
        del sd[k_unet]
    elif case == "wrong_shape_unet":
        sd[k_unet] = torch.zeros(2, 2)
    elif case == "te_no_layers":
        sd = {k: v for k, v in sd.items() if ".encoder.layers." not in k}
    save_file(sd, str(dst), metadata=meta)
    return {"wrong_shape_to_k": k_to_k, "missing_unet_key": "input_blocks.1.resnets" if False else None}.get(case)


@pytest.mark.parametrize(
    "case,words",
    [
        ("unet_config_not_json", ("ws_unet_config", "not valid JSON", "remove the ws_unet_config")),
        ("unet_config_a_list", ("ws_unet_config", "not a JSON object")),
        ("unet_config_contradicts", ("ws_unet_config", "cross_attention_dim = 999 contradicts the weights")),
        ("heads_not_json", ("ws_text_encoder_heads", "not valid JSON")),
        ("heads_not_dividing", ("ws_text_encoder_heads", "7 attention heads", "do not divide")),
        ("heads_negative", ("ws_text_encoder_heads", "not a positive integer")),
        ("wrong_shape_to_k", ("attn2.to_k.weight", "has shape (3, 3)")),
        ("wrong_shape_te", ("layers.0.self_attn.q_proj.weight", "has shape (5, 5)")),
        ("te_no_layers", ("text encoder is incomplete", "layers.0")),
    ],
)
def test_a_damaged_checkpoint_is_one_sentence_naming_the_entry_or_key(
    case, words, cli_cases, tiny_checkpoints, tokenizer_dir, tmp_path, capsys
):
    bad = tmp_path / "bad.safetensors"
    _surgery(tiny_checkpoints["sd1"], bad, case)
    before = cli_cases.sha(bad)
    out = tmp_path / "o.safetensors"
    cli_cases.fails(capsys, cli_cases.erase(bad, tokenizer_dir, out, "--format", "lora"), *words)
    assert not out.exists() and cli_cases.sha(bad) == before and cli_cases.no_temp(tmp_path)


@pytest.mark.parametrize("case", ["fifo_model", "fifo_lora", "symlink_loop", "broken_link", "socket_model"])
def test_an_input_that_is_not_a_regular_file_is_refused_without_blocking(
    case, cli_cases, tiny_checkpoints, tokenizer_dir, lora_files, tmp_path, capsys
):
    p = tmp_path / "in.safetensors"
    sock = None
    if case.startswith("fifo"):
        os.mkfifo(p)
    elif case == "symlink_loop":
        os.symlink(p, p)
    elif case == "broken_link":
        os.symlink(tmp_path / "gone.safetensors", p)
    else:
        sock = unix_socket_at(p)
    try:
        out = tmp_path / "o.safetensors"
        if case == "fifo_lora":
            argv = cli_cases.merge(tiny_checkpoints["sd1"], tokenizer_dir, [lora_files[0], p], out)
        else:
            argv = cli_cases.erase(p, tokenizer_dir, out, "--format", "lora")
        words = {
            "fifo_model": ("a FIFO", "not a regular file"),
            "fifo_lora": ("LoRA", "a FIFO"),
            "symlink_loop": ("symlink loop",),
            "broken_link": ("gone.safetensors", "does not exist"),
            "socket_model": ("a socket",),
        }[case]
        err = cli_cases.fails(capsys, argv, *words, str(p))
        assert "download" not in err and not out.exists()
    finally:
        if sock is not None:
            sock.close()


_AS_NOBODY = r"""
import os, sys
from weightsmith.core.cli import build_parser, main
import safetensors.torch, weightsmith.core.model_io, weightsmith.core.lora_read, weightsmith.core.merge
import weightsmith.core.merge.cli, weightsmith.core.erase.pipeline
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer, CLIPTextConfig
from diffusers import UNet2DConditionModel, DDIMScheduler
build_parser()                                # every import done as root (the interpreter is in /root)
os.setgroups([]); os.setgid(65534); os.setuid(65534)
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.parametrize("case", ["mode_000_model", "mode_000_lora", "unreachable_folder"])
def test_an_unreadable_input_says_permission_not_damage(
    case, cli_cases, tiny_checkpoints, tokenizer_dir, lora_files, request
):
    """Run as the unprivileged user ``nobody`` (root reads everything); skipped when not root."""
    import shutil
    import subprocess
    import sys

    if os.geteuid() != 0:
        pytest.skip("switching to the user nobody needs root")
    import tempfile

    work = Path(tempfile.mkdtemp(prefix="ws-nobody-"))  # pytest's own folders are private to root
    request.addfinalizer(lambda: shutil.rmtree(work, ignore_errors=True))
    os.chmod(work, 0o755)
    shutil.copytree(tokenizer_dir, work / "tok")
    ck, lo = work / "m.safetensors", work / "l.safetensors"
    shutil.copy(tiny_checkpoints["sd1"], ck)
    shutil.copy(lora_files[0], lo)
    secret = work / "secret"
    if case == "unreachable_folder":
        secret.mkdir()
        shutil.move(str(ck), secret / "m.safetensors")
        ck = secret / "m.safetensors"
    for p in [work, *work.rglob("*")]:
        os.chmod(p, 0o777 if p.is_dir() else 0o644)
    if case == "mode_000_model":
        os.chmod(ck, 0)
    elif case == "mode_000_lora":
        os.chmod(lo, 0)
    else:
        os.chmod(secret, 0o700)
    argv = (
        [str(a) for a in cli_cases.merge(ck, work / "tok", [lo], work / "o.safetensors")]
        if case == "mode_000_lora"
        else [str(a) for a in cli_cases.erase(ck, work / "tok", work / "o.safetensors", "--format", "lora")]
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "HOME": str(work), "XDG_CACHE_HOME": str(work)}
    r = subprocess.run(
        [sys.executable, "-c", _AS_NOBODY, *argv], capture_output=True, text=True, env=env, timeout=600, cwd=str(work)
    )
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr
    assert "download" not in r.stderr and "choose another folder" not in r.stderr, r.stderr
    want = "a folder on its way" if case == "unreachable_folder" else "not readable by this user"
    assert want in r.stderr, r.stderr


# ----------------------------------------------------------------------------------------------
# LoRA modules validated before use; LyCORIS products sized from their factor shapes (issue 37)
def _lyco_case(model, case):
    from weightsmith.core.naming import kohya_prefix

    lin = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k"
    o, i = model.weight(lin).shape
    p = kohya_prefix(lin, "sd1", model.layout)
    z = torch.zeros
    return p, {
        "rank_0": {p + ".lora_up.weight": z(o, 0), p + ".lora_down.weight": z(0, i)},
        "rank_0_alpha": {
            p + ".lora_up.weight": z(o, 0),
            p + ".lora_down.weight": z(0, i),
            p + ".alpha": torch.tensor(1.0),
        },
        "alpha_no_elements": {p + ".lora_up.weight": z(o, 2), p + ".lora_down.weight": z(2, i), p + ".alpha": z(0)},
        "up_3d": {p + ".lora_up.weight": z(o, 2, 1), p + ".lora_down.weight": z(2, i)},
        "up_0d": {p + ".lora_up.weight": torch.tensor(1.0), p + ".lora_down.weight": z(2, i)},
        "loha_inner_ranks": {
            p + ".hada_w1_a": z(o, 2),
            p + ".hada_w1_b": z(3, i),
            p + ".hada_w2_a": z(o, 2),
            p + ".hada_w2_b": z(2, i),
        },
        "loha_bomb": {
            p + ".hada_w1_a": z(120000, 1),
            p + ".hada_w1_b": z(1, 120000),
            p + ".hada_w2_a": z(120000, 1),
            p + ".hada_w2_b": z(1, 120000),
        },
        "lokr_bomb": {p + ".lokr_w1": z(1000, 1000), p + ".lokr_w2": z(1000, 1000)},
    }[case]


@pytest.mark.parametrize(
    "case,words",
    [
        ("rank_0", ("empty", "rank 0")),
        ("rank_0_alpha", ("empty", "rank 0")),
        ("alpha_no_elements", ("alpha has no elements",)),
        ("up_3d", ("3-D up factor",)),
        ("up_0d", ("0-D up factor",)),
        ("loha_inner_ranks", ("hada_w1_a (", "inner dimensions differ")),
        ("loha_bomb", ("LoHa", "14,400,000,000 entries", "Nothing was expanded")),
        ("lokr_bomb", ("LoKr", "1,000,000,000,000 entries", "Nothing was expanded")),
    ],
)
def test_a_malformed_lora_module_is_one_sentence_and_nothing_is_expanded(case, words, tiny_models, tmp_path):
    import time

    from weightsmith.core.lora_read import load_lora

    prefix, sd = _lyco_case(tiny_models["sd1"], case)
    f = tmp_path / f"{case}.safetensors"
    save_file(sd, str(f))
    t0 = time.perf_counter()
    with pytest.raises(WeightsmithError) as e:
        load_lora(f, tiny_models["sd1"])
    assert time.perf_counter() - t0 < 30  # refused from the shapes, not after a 10^12-entry product
    for w in words:
        assert w in str(e.value), str(e.value)
    assert prefix in str(e.value)


@pytest.mark.parametrize(
    "case,words",
    [
        ("index_not_json", ("model_index.json is not valid JSON",)),
        ("index_a_list", ("model_index.json is a JSON list",)),
        ("scheduler_not_json", ("scheduler_config.json is not valid JSON",)),
        ("scheduler_unknown_class", ("names the scheduler 5", "_class_name")),
        ("no_unet_weights", ("has no UNet weights", "diffusion_pytorch_model.safetensors is missing")),
    ],
)
def test_a_damaged_diffusers_folder_is_one_sentence_naming_the_file(
    case, words, cli_cases, tiny_models, tmp_path, capsys, diffusers_folder
):
    import json

    src = diffusers_folder(tiny_models["sd1"], tmp_path / "model")
    (src / "scheduler").mkdir(exist_ok=True)
    (src / "scheduler" / "scheduler_config.json").write_text(json.dumps({"_class_name": "DDIMScheduler"}))
    if case == "index_not_json":
        (src / "model_index.json").write_text("{broken")
    elif case == "index_a_list":
        (src / "model_index.json").write_text("[1]")
    elif case == "scheduler_not_json":
        (src / "scheduler" / "scheduler_config.json").write_text("{x")
    elif case == "scheduler_unknown_class":
        (src / "scheduler" / "scheduler_config.json").write_text('{"_class_name": 5}')
    else:
        (src / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    out = tmp_path / "edited"
    argv = ["erase", "--model", src, "--target", "cat", "--anchor", "dog", "--no-expand", "--quiet", "--out", out]
    err = cli_cases.fails(capsys, argv, *words)
    assert "OSError" not in err and "could not access :" not in err
    assert not out.exists() and cli_cases.no_temp(tmp_path)
