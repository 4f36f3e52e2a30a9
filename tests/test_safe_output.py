"""Written paths: never an input, never each other, never a device or FIFO renamed over; file-system
faults give one line and leave no temp file; outputs get the umask mode. docs/reliability.md
tabulates these cases (issues 12 and 37)."""

import errno
import os
import stat
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from weightsmith.core.cli import main
from weightsmith.core.errors import WeightsmithError

sys.path.insert(0, str(Path(__file__).parent))
from ws_sockets import unix_socket_at  # noqa: E402


@pytest.mark.parametrize(
    "case",
    [
        "erase_report_is_model",
        "erase_report_is_out",
        "erase_report_is_tokenizer",
        "merge_report_is_model",
        "merge_report_is_lora",
        "merge_report_is_out",
        "merge_out_is_lora",
        "merge_out_is_model_symlink",
    ],
)
def test_written_paths_never_replace_an_input(
    cli_cases, case, tiny_checkpoints, tokenizer_dir, lora_files, tmp_path, capsys
):
    ck = tmp_path / "model.safetensors"
    ck.write_bytes(tiny_checkpoints["sd1"].read_bytes())
    out = tmp_path / "out.safetensors"
    inputs = [ck] + lora_files
    before = {p: cli_cases.sha(p) for p in inputs}
    words = {
        "erase_report_is_model": ("--report", "is the input model"),
        "erase_report_is_out": ("--out and --report are the same path",),
        "erase_report_is_tokenizer": ("--report", "--tokenizer"),
        "merge_report_is_model": ("--report", "is the input model"),
        "merge_report_is_lora": ("--report", "is the input LoRA"),
        "merge_report_is_out": ("--out and --report are the same path",),
        "merge_out_is_lora": ("--out", "is the input LoRA"),
        "merge_out_is_model_symlink": ("--out", "is the input model"),
    }[case]
    if case.startswith("erase"):
        rep = {"erase_report_is_model": ck, "erase_report_is_out": out, "erase_report_is_tokenizer": tokenizer_dir}[
            case
        ]
        argv = cli_cases.erase(ck, tokenizer_dir, out, "--format", "lora", "--report", rep)
    else:
        o, rep = out, None
        if case == "merge_report_is_model":
            rep = ck
        elif case == "merge_report_is_lora":
            rep = lora_files[1]
        elif case == "merge_report_is_out":
            rep = out
        elif case == "merge_out_is_lora":
            o = lora_files[0]
        else:
            o = tmp_path / "alias.safetensors"
            o.symlink_to(ck)
        argv = cli_cases.merge(ck, tokenizer_dir, lora_files, o, *(["--report", rep] if rep else []))
    cli_cases.fails(capsys, argv, *words)
    assert {p: cli_cases.sha(p) for p in inputs} == before
    assert not out.exists() and cli_cases.no_temp(tmp_path)


def test_api_save_lora_and_save_merge_refuse_their_inputs(
    cli_cases, tiny_models, tiny_checkpoints, tokenizer_dir, lora_files, tmp_path
):
    from weightsmith.core.erase import EraseOptions, erase
    from weightsmith.core.lora_write import save_lora
    from weightsmith.core.merge import merge, save_merge
    from weightsmith.core.model_io import load_model, save_edited_model

    ck = tmp_path / "model.safetensors"
    ck.write_bytes(tiny_checkpoints["sd1"].read_bytes())
    h = {p: cli_cases.sha(p) for p in [ck] + lora_files}
    model = load_model(ck, tokenizer=tokenizer_dir)
    edit = erase(model, ["cat"], ["dog"], method="uce", options=EraseOptions(expand_prompts=False))
    with pytest.raises(WeightsmithError, match="is the input model"):
        save_lora(edit, ck)
    with pytest.raises(WeightsmithError, match="is the input model"):
        save_lora(edit.scaled(0.5), str(ck))  # a scaled edit keeps its sources
    with pytest.raises(WeightsmithError, match="is the input model"):
        save_edited_model(model, edit.deltas, ck)
    m = merge(model, lora_files, "concat")
    for target in lora_files + [ck]:
        with pytest.raises(WeightsmithError, match="is the input"):
            save_lora(m, target)
        with pytest.raises(WeightsmithError, match="is the input"):
            save_merge(m, model, target)
    with pytest.raises(WeightsmithError, match="is the input LoRA"):
        save_merge(m, model, lora_files[1])
    assert {p: cli_cases.sha(p) for p in [ck] + lora_files} == h
    save_lora(edit, tmp_path / "fine.safetensors")  # a new path is fine
    assert (tmp_path / "fine.safetensors").exists()


@pytest.mark.parametrize("case", ["inside", "file_name"])
def test_diffusers_output_inside_the_model_or_named_as_a_file_is_refused(
    cli_cases, case, tiny_models, tmp_path, capsys, diffusers_folder
):
    import time

    src = diffusers_folder(tiny_models["sd1"], tmp_path / "model")
    files = sorted(p for p in src.rglob("*"))
    out = src / "edited" if case == "inside" else tmp_path / "x.safetensors"
    t0 = time.time()
    cli_cases.fails(
        capsys,
        ["erase", "--model", src, "--target", "cat", "--anchor", "dog", "--no-expand", "--quiet", "--out", out],
        "inside" if case == "inside" else "folder",
    )
    assert time.time() - t0 < 20  # refused up front, no recursive copy
    assert sorted(p for p in src.rglob("*")) == files and not out.exists()
    assert cli_cases.no_temp(tmp_path)


def test_out_that_is_an_existing_folder_is_refused(cli_cases, tiny_checkpoints, tokenizer_dir, tmp_path, capsys):
    d = tmp_path / "adir.safetensors"
    d.mkdir()
    cli_cases.fails(
        capsys, cli_cases.erase(tiny_checkpoints["sd1"], tokenizer_dir, d, "--format", "lora"), "existing folder"
    )
    assert not list(d.iterdir())


@pytest.mark.parametrize("which", ["output", "report"])
@pytest.mark.parametrize("command", ["erase", "merge"])
def test_full_disk_gives_one_line_and_no_temp_file(
    cli_cases, which, command, tiny_checkpoints, tokenizer_dir, lora_files, tmp_path, capsys, monkeypatch
):
    real = os.replace

    def full(src, dst, *a, **k):
        if str(dst).endswith(".json" if which == "report" else ".safetensors"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(src))
        return real(src, dst, *a, **k)

    monkeypatch.setattr(os, "replace", full)
    out, rep = tmp_path / "o.safetensors", tmp_path / "o.json"
    argv = (
        cli_cases.erase(tiny_checkpoints["sd1"], tokenizer_dir, out, "--format", "lora", "--report", rep)
        if command == "erase"
        else cli_cases.merge(tiny_checkpoints["sd1"], tokenizer_dir, lora_files, out, "--report", rep)
    )
    err = cli_cases.fails(capsys, argv, "disk is full")
    assert cli_cases.no_temp(tmp_path)
    assert not rep.exists()
    if which == "report":  # the output is complete and says so
        assert "was written and is complete, but the report was not" in err
        assert load_file(str(out))
    else:
        assert not out.exists()


def test_permission_denied_at_write_gives_one_line(
    cli_cases, tiny_checkpoints, tokenizer_dir, tmp_path, capsys, monkeypatch
):
    import tempfile

    def denied(*a, **k):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), k.get("dir"))

    monkeypatch.setattr(tempfile, "mkstemp", denied)
    out = tmp_path / "o.safetensors"
    cli_cases.fails(
        capsys, cli_cases.erase(tiny_checkpoints["sd1"], tokenizer_dir, out, "--format", "lora"), "permission denied"
    )
    assert not out.exists()


@pytest.mark.parametrize("umask", [0o022, 0o002])
def test_outputs_get_the_mode_a_plain_open_gives_under_the_umask(
    cli_cases, umask, tiny_models, tiny_checkpoints, tokenizer_dir, tmp_path, capsys, diffusers_folder
):
    old = os.umask(umask)
    try:
        ck = tmp_path / "ck.safetensors"
        lo, rep = tmp_path / "lo.safetensors", tmp_path / "lo.json"
        args = cli_cases.erase(tiny_checkpoints["sd1"], tokenizer_dir, ck)
        assert main(args) == 0
        assert (
            main(cli_cases.erase(tiny_checkpoints["sd1"], tokenizer_dir, lo, "--format", "lora", "--report", rep)) == 0
        )
        src = diffusers_folder(tiny_models["sd1"], tmp_path / "dm")
        dout = tmp_path / "dm-edited"
        assert (
            main(
                [
                    "erase",
                    "--model",
                    str(src),
                    "--target",
                    "cat",
                    "--anchor",
                    "dog",
                    "--no-expand",
                    "--quiet",
                    "--out",
                    str(dout),
                ]
            )
            == 0
        )
        ref = tmp_path / "plain"
        ref.write_bytes(b"x")  # what a normal write gives
        want = stat.S_IMODE(ref.stat().st_mode)
        assert want == 0o666 & ~umask
        for p in (ck, lo, rep, dout / "unet" / "diffusion_pytorch_model.safetensors"):
            assert stat.S_IMODE(p.stat().st_mode) == want, p
        assert stat.S_IMODE(dout.stat().st_mode) == 0o777 & ~umask
    finally:
        os.umask(old)


# ----------------------------------------------------------------------------------------------
# special output paths (issue 37): a device, FIFO or socket is never renamed over
def _special(kind, path):
    """Make a special file ``path`` of ``kind``; returns a cleanup callable (or skips with the reason)."""
    if kind == "fifo":
        os.mkfifo(path)
        return lambda: None
    if kind == "socket":
        return unix_socket_at(path).close
    try:  # a character device like /dev/null (1, 3)
        os.mknod(path, 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    except PermissionError:
        pytest.skip("making a device node needs root (os.mknod: permission denied)")
    return lambda: None


_TESTS = {"fifo": stat.S_ISFIFO, "socket": stat.S_ISSOCK, "chardev": stat.S_ISCHR}


@pytest.mark.parametrize("kind", ["fifo", "socket", "chardev"])
@pytest.mark.parametrize("command", ["erase", "merge"])
def test_out_that_is_a_device_fifo_or_socket_is_refused_before_loading(
    kind, command, cli_cases, tiny_checkpoints, tokenizer_dir, lora_files, tmp_path, capsys, monkeypatch
):
    import weightsmith.core.model_io as mio

    monkeypatch.setattr(mio, "load_model", lambda *a, **k: pytest.fail("loaded the model before refusing --out"))
    out = tmp_path / "o.safetensors"
    close = _special(kind, out)
    try:
        argv = (
            cli_cases.erase(tiny_checkpoints["sd1"], tokenizer_dir, out, "--format", "lora")
            if command == "erase"
            else cli_cases.merge(tiny_checkpoints["sd1"], tokenizer_dir, lora_files, out)
        )
        cli_cases.fails(capsys, argv, "--out", "not a regular file", "renamed into place")
        assert _TESTS[kind](os.lstat(out).st_mode)  # still the node it was
        assert cli_cases.no_temp(tmp_path)
    finally:
        close()


def test_report_to_a_fifo_is_streamed_and_the_fifo_kept(cli_cases, tiny_checkpoints, tokenizer_dir, tmp_path):
    import json
    import threading

    fifo = tmp_path / "report.fifo"
    os.mkfifo(fifo)
    got = []
    reader = threading.Thread(target=lambda: got.append(open(fifo, "rb").read()), daemon=True)
    reader.start()
    out = tmp_path / "o.safetensors"
    assert main(cli_cases.erase(tiny_checkpoints["sd1"], tokenizer_dir, out, "--format", "lora", "--report", fifo)) == 0
    reader.join(30)
    assert got and json.loads(got[0])["method"] == "erasepro"
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode) and load_file(str(out))
    assert cli_cases.no_temp(tmp_path)


def test_report_to_a_fifo_nobody_reads_is_refused_not_waited_on(
    cli_cases, tiny_checkpoints, tokenizer_dir, tmp_path, capsys
):
    fifo = tmp_path / "report.fifo"
    os.mkfifo(fifo)
    out = tmp_path / "o.safetensors"
    err = cli_cases.fails(
        capsys,
        cli_cases.erase(tiny_checkpoints["sd1"], tokenizer_dir, out, "--format", "lora", "--report", fifo),
        "no process is reading",
    )
    assert "was written and is complete" in err and load_file(str(out))
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode) and cli_cases.no_temp(tmp_path)


def test_report_to_a_socket_is_refused_before_loading(cli_cases, tiny_checkpoints, tokenizer_dir, tmp_path, capsys):
    sock = tmp_path / "r.sock"
    close = _special("socket", sock)
    try:
        cli_cases.fails(
            capsys,
            cli_cases.erase(
                tiny_checkpoints["sd1"], tokenizer_dir, tmp_path / "o.safetensors", "--format", "lora", "--report", sock
            ),
            "--report",
            "a socket",
        )
        assert stat.S_ISSOCK(os.lstat(sock).st_mode) and not (tmp_path / "o.safetensors").exists()
    finally:
        close()


def test_report_to_a_char_device_node_is_written_into_it_not_replacing_it(
    cli_cases, tiny_checkpoints, tokenizer_dir, tmp_path
):
    null = tmp_path / "null"
    _special("chardev", null)
    out = tmp_path / "o.safetensors"
    assert main(cli_cases.erase(tiny_checkpoints["sd1"], tokenizer_dir, out, "--format", "lora", "--report", null)) == 0
    st = os.lstat(null)
    assert stat.S_ISCHR(st.st_mode) and st.st_rdev == os.makedev(1, 3)
    assert cli_cases.no_temp(tmp_path)


_DEV_NULL_SCRIPT = r"""
import os, stat, sys
from weightsmith.core.cli import main
rc = main(sys.argv[1:])
st = os.lstat("/dev/null")
print("RESULT", rc, stat.S_ISCHR(st.st_mode), st.st_rdev == os.makedev(1, 3),
      [p for p in os.listdir("/dev") if p.startswith(".ws-")])
"""


@pytest.mark.slow
def test_report_to_the_real_dev_null_and_dev_stdout_keeps_them(cli_cases, tiny_checkpoints, tokenizer_dir, tmp_path):
    """The system's /dev/null and /dev/stdout: run in a private mount namespace with a fresh /dev
    tmpfs where unshare works (root), so a regression cannot damage the machine; else directly."""
    import json
    import shutil
    import subprocess
    import sys

    out = tmp_path / "o.safetensors"
    py = [sys.executable, "-c", _DEV_NULL_SCRIPT]
    args = [str(a) for a in cli_cases.erase(tiny_checkpoints["sd1"], tokenizer_dir, out, "--format", "lora")]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    ns = (
        shutil.which("unshare")
        and os.geteuid() == 0
        and subprocess.run(["unshare", "-m", "true"], capture_output=True).returncode == 0
    )
    for target in ("/dev/null", "/dev/stdout"):
        cmd = py + args + ["--report", target]
        if ns:
            import shlex

            setup = (
                "mount --make-rprivate / && mount -t tmpfs tmpfs /dev && mknod -m 666 /dev/null c 1 3 && "
                "mknod -m 666 /dev/zero c 1 5 && mknod -m 666 /dev/random c 1 8 && "
                "mknod -m 666 /dev/urandom c 1 9 && mkdir /dev/shm && "
                "ln -s /proc/self/fd /dev/fd && ln -s /proc/self/fd/1 /dev/stdout && "
            )
            cmd = ["unshare", "-m", "sh", "-c", setup + " ".join(shlex.quote(c) for c in cmd)]
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
        assert r.returncode == 0, r.stderr
        res = next(l for l in r.stdout.splitlines() if l.startswith("RESULT"))
        assert res == "RESULT 0 True True []", (res, r.stderr)
        if target == "/dev/stdout":  # the JSON report came out on stdout
            assert json.loads(r.stdout[r.stdout.index("{") : r.stdout.rindex("}") + 1])["method"] == "erasepro"
    assert stat.S_ISCHR(os.lstat("/dev/null").st_mode)


def test_checkpoint_to_dev_null_is_refused(cli_cases, tiny_checkpoints, tokenizer_dir, tmp_path, capsys):
    cli_cases.fails(
        capsys,
        [
            "erase",
            "--model",
            tiny_checkpoints["sd1"],
            "--tokenizer",
            tokenizer_dir,
            "--target",
            "cat",
            "--anchor",
            "dog",
            "--no-expand",
            "--quiet",
            "--format",
            "lora",
            "--out",
            "/dev/null",
        ],
        "--out",
    )
    assert stat.S_ISCHR(os.lstat("/dev/null").st_mode)


def test_api_writers_never_rename_over_a_fifo(tiny_models, tmp_path):
    from weightsmith.core.model_io import atomic_save_file
    from weightsmith.core.safe_io import write_json

    fifo = tmp_path / "x.safetensors"
    os.mkfifo(fifo)
    with pytest.raises(WeightsmithError, match="not a regular file"):
        atomic_save_file({"a": torch.ones(2)}, fifo)
    with pytest.raises(WeightsmithError, match="no process is reading"):
        write_json(fifo, {"a": 1})
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode) and [p.name for p in tmp_path.iterdir()] == ["x.safetensors"]
