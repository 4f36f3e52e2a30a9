"""A seeded fuzz test of the readers (issue 37; docs/reliability.md, "Fuzzed readers"): mutated
safetensors headers and bytes, LoRA key and shape layouts, checkpoint metadata and tokenizer folders.
Every case ends in a :class:`WeightsmithError` or a correct result — never another exception, a hang
(each case has its own time limit) or a written file. The whole run is bounded in time
(``WEIGHTSMITH_FUZZ_SECONDS``, default 40; the seed is ``WEIGHTSMITH_FUZZ_SEED``, default 0)."""

import json
import os
import random
import signal
import struct
import time

import pytest
import torch
from safetensors.torch import save, save_file

from weightsmith.core.errors import WeightsmithError
from weightsmith.core.lab.random_loras import random_lora

CASE_LIMIT_S = 20  # one case past this is a hang
BUDGET_S = float(os.environ.get("WEIGHTSMITH_FUZZ_SECONDS", "40"))
SEED = int(os.environ.get("WEIGHTSMITH_FUZZ_SEED", "0"))


class _Hang(Exception):
    pass


def _alarm(signum, frame):
    raise _Hang


def _run_case(fn):
    """``fn()`` under a per-case time limit: returns ("ok", result) or ("refused", message)."""
    old = signal.signal(signal.SIGALRM, _alarm)
    signal.setitimer(signal.ITIMER_REAL, CASE_LIMIT_S)
    try:
        return "ok", fn()
    except WeightsmithError as e:
        assert str(e) and "\n" not in str(e).strip() or len(str(e)) < 2000
        return "refused", str(e)
    except _Hang:
        pytest.fail(f"a reader did not finish within {CASE_LIMIT_S} s (a hang)")
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


# ---------------------------------------------------------------- mutations
def _split(raw: bytes):
    n = struct.unpack("<Q", raw[:8])[0]
    return json.loads(raw[8 : 8 + n]), raw[8 + n :]


def _join(header: dict, data: bytes, pad=True) -> bytes:
    h = json.dumps(header).encode()
    if pad:
        h += b" " * (-len(h) % 8)
    return struct.pack("<Q", len(h)) + h + data


def _mutate_bytes(raw: bytes, rng: random.Random) -> bytes:
    """Byte-level damage of a safetensors file (header length, header JSON, offsets, dtypes, data)."""
    header, data = _split(raw)
    keys = [k for k in header if k != "__metadata__"]
    k = rng.choice(keys)
    op = rng.randrange(12)
    if op == 0:  # truncate anywhere
        return raw[: rng.randrange(len(raw))]
    if op == 1:  # header length lies
        return struct.pack("<Q", rng.choice([0, 1, len(raw), 2**40, 2**64 - 1])) + raw[8:]
    if op == 2:  # flip bytes inside the header
        b = bytearray(raw)
        for _ in range(rng.randint(1, 8)):
            i = rng.randrange(8, 8 + struct.unpack("<Q", raw[:8])[0])
            b[i] = rng.randrange(256)
        return bytes(b)
    if op == 3:
        header[k]["dtype"] = rng.choice(["F16", "BF16", "I8", "U8", "BOOL", "F64", "I64", "X9", "F8_E4M3"])
    elif op == 4:
        header[k]["shape"] = rng.choice(
            [
                [],
                [0],
                [1 << 40, 2],
                [-1, 3],
                [3, 1, 1, 1, 1],
                ["a"],
                [x * 2 for x in header[k]["shape"]],
                header[k]["shape"][::-1],
            ]
        )
    elif op == 5:
        a, b = header[k]["data_offsets"]
        header[k]["data_offsets"] = rng.choice(
            [[b, a], [a, b + 4], [a + 2, b], [0, 0], [a, len(data) + 8], [-1, b], [a, 2**63]]
        )
    elif op == 6:
        del header[k]["data_offsets"]
    elif op == 7:
        header["__metadata__"] = rng.choice(
            [{"x": 1}, [1], "s", {"ss_network_alpha": "nan"}, {"ws_unet_config": "{"}, {"modelspec.architecture": None}]
        )
    elif op == 8:
        header[k + rng.choice([".x", "", "\u0000", "..", ".alpha"])] = dict(header[k])
    elif op == 9:
        return _join(header, data, pad=False) + bytes(rng.randrange(256) for _ in range(rng.randint(0, 7)))
    elif op == 10:  # damage the tensor bytes (NaN patterns included)
        b = bytearray(data)
        for _ in range(rng.randint(1, 16)):
            i = rng.randrange(len(b))
            b[i] = rng.choice([0xFF, 0x7F, 0xC0, 0x00, rng.randrange(256)])
        data = bytes(b)
    else:
        header = rng.choice([{}, {"__metadata__": {}}, {"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}])
    return _join(header, data)


def _mutate_lora(tensors: dict, rng: random.Random) -> dict:
    """LoRA key/shape layout damage: factor shapes and ranks, roles, alphas, key spellings."""
    t = dict(tensors)
    k = rng.choice(sorted(t))
    v = t[k]
    op = rng.randrange(11)
    if op == 0:
        t[k] = v.T.contiguous() if v.dim() == 2 else v.reshape(-1)
    elif op == 1:
        t[k] = v.reshape(*v.shape, 1) if v.dim() else torch.zeros(0)
    elif op == 2:
        t[k] = torch.zeros(*(s if rng.random() < 0.5 else 0 for s in v.shape)) if v.dim() else torch.zeros(0)
    elif op == 3:
        del t[k]
    elif op == 4:
        t[k.replace("lora_up", "lora_mid").replace("lora_down", "hada_w1_a")] = t.pop(k)
    elif op == 5:
        t[k] = v.to(rng.choice([torch.int8, torch.float16, torch.bfloat16, torch.int64, torch.bool]))
    elif op == 6:
        base = k.rsplit(".", 2)[0] if k.endswith(".weight") else k.rsplit(".", 1)[0]
        t[base + ".alpha"] = rng.choice(
            [torch.tensor(float("nan")), torch.zeros(0), torch.tensor(-4.0), torch.zeros(3, 3), torch.tensor(1e30)]
        )
    elif op == 7:
        base = k.rsplit(".", 2)[0] if k.endswith(".weight") else k.rsplit(".", 1)[0]
        for r in ("lokr_w1", "lokr_w2"):
            t[f"{base}.{r}"] = torch.zeros(rng.choice([1, 3, 700]), rng.choice([1, 5, 900]))
    elif op == 8:
        base = k.rsplit(".", 2)[0] if k.endswith(".weight") else k.rsplit(".", 1)[0]
        for r in ("hada_w1", "hada_w2"):  # factors of a few hundred kB, products up to 1.6e9
            t[f"{base}.{r}_a"] = torch.zeros(rng.choice([0, 1, 2, 40000]), rng.choice([1, 2, 3]))
            t[f"{base}.{r}_b"] = torch.zeros(rng.choice([1, 2, 3]), rng.choice([0, 1, 2, 40000]))
    elif op == 9:
        t[rng.choice(["lora_unet_x.lora_up.weight", "diffusion_model.y.weight", k.upper(), k + k, "lora_te_"])] = v
    else:
        t[k] = torch.full_like(v, rng.choice([float("inf"), 1e38, -0.0])) if v.is_floating_point() else v
    return t


def _mutate_tokenizer(folder, rng: random.Random) -> None:
    names = sorted(p.name for p in folder.iterdir())
    name = rng.choice(names)
    p = folder / name
    op = rng.randrange(6)
    if op == 0:
        p.unlink()
    elif op == 1:
        raw = p.read_bytes()
        p.write_bytes(raw[: rng.randrange(max(1, len(raw)))])
    elif op == 2:
        p.write_bytes(bytes(rng.randrange(256) for _ in range(64)))
    elif op == 3:
        p.write_text(rng.choice(["[]", "{}", "null", '{"a": "b"}', '"x"', "1"]))
    elif op == 4:
        p.unlink()
        p.mkdir()
    else:
        if name == "merges.txt":
            p.write_text("#version: 0.2\nzz yy xx\nq\n")
        elif name == "vocab.json":
            p.write_text(json.dumps({"a": "b", "c": -1}))
        else:
            p.write_text(json.dumps({"model": {"type": rng.choice(["BPE", "WordPiece", 5]), "vocab": []}}))


# ---------------------------------------------------------------- checks of a "correct result"
def _lora_is_correct(lora, model):
    for n, mod in lora.modules.items():
        d = mod.delta()
        assert tuple(d.shape) == tuple(model.weight(n).shape), n
        assert torch.isfinite(d).all(), n


@pytest.mark.slow
def test_readers_on_seeded_mutated_files_give_a_sentence_or_a_correct_result(
    tiny_models, tiny_checkpoints, tokenizer_dir, tmp_path
):
    import shutil

    from weightsmith.core.lora_read import load_lora
    from weightsmith.core.model_io import load_model
    from weightsmith.core.tokenizer import load_tokenizer_folder

    model = tiny_models["sd1"]
    rng = random.Random(SEED)
    t0, _ = random_lora(model, groups=("attn", "te"), rank=2, seed=SEED)
    lora_raw = save(t0)
    ck_raw = tiny_checkpoints["sd1"].read_bytes()
    work = tmp_path / "work"
    work.mkdir()
    counts = {"ok": 0, "refused": 0}
    kinds = {"lora_bytes": 0, "lora_layout": 0, "checkpoint": 0, "tokenizer": 0}
    deadline = time.monotonic() + BUDGET_S
    i = 0
    while time.monotonic() < deadline:
        kind = ("lora_bytes", "lora_layout", "lora_layout", "tokenizer", "checkpoint")[i % 5]
        i += 1
        for p in work.iterdir():
            shutil.rmtree(p) if p.is_dir() else p.unlink()
        if kind == "lora_bytes":
            f = work / "case.safetensors"
            f.write_bytes(_mutate_bytes(lora_raw, rng))
            status, res = _run_case(lambda f=f: load_lora(f, model))
            if status == "ok":
                _lora_is_correct(res, model)
        elif kind == "lora_layout":
            f = work / "case.safetensors"
            t = _mutate_lora(t0, rng)
            if rng.random() < 0.3:
                t = _mutate_lora(t, rng)
            save_file({k: v.clone().contiguous() for k, v in t.items()}, str(f))
            status, res = _run_case(lambda f=f: load_lora(f, model))
            if status == "ok":
                _lora_is_correct(res, model)
        elif kind == "tokenizer":
            f = work / "tok"
            shutil.copytree(tokenizer_dir, f)
            _mutate_tokenizer(f, rng)
            status, res = _run_case(lambda f=f: load_tokenizer_folder(f))
            if status == "ok":
                assert res("cat").input_ids[0] == res.bos_token_id
        else:
            f = work / "case.safetensors"
            f.write_bytes(_mutate_bytes(ck_raw, rng))
            status, res = _run_case(lambda f=f: load_model(f, tokenizer=tokenizer_dir))
            if status == "ok":
                assert res.family == "sd1" and res.text_encoders
        counts[status] += 1
        kinds[kind] += 1
        left = sorted(p.name for p in work.iterdir())
        assert left == [f.name], f"a reader wrote {left}"  # nothing written beside the input
    assert sum(counts.values()) >= 20 and min(kinds.values()) >= 3, (counts, kinds)
    assert counts["refused"] > 0
    print(f"fuzz: {i} cases in {BUDGET_S:.0f} s, {counts}, {kinds}")
