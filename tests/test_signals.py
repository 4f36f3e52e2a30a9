"""Ctrl-C, SIGTERM and SIGHUP: one line, exit 128 + N, every temp file removed, what was written
completely named; docs/reliability.md, "File system"."""

import os

import pytest


def test_ctrl_c_after_the_output_was_written_says_so(
    cli_cases, tiny_checkpoints, tokenizer_dir, tmp_path, capsys, monkeypatch
):
    import weightsmith.core.erase.cli as ecli

    def interrupt(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(ecli, "print_summary", interrupt)
    out = tmp_path / "o.safetensors"
    err = cli_cases.fails(
        capsys,
        cli_cases.erase(tiny_checkpoints["sd1"], tokenizer_dir, out, "--format", "lora"),
        str(out),
        "written completely",
        rc=130,
    )
    assert "nothing was written" not in err and out.exists()


def test_ctrl_c_during_start_up_is_one_line(cli_cases, capsys, monkeypatch):
    import weightsmith.core.cli as cli

    def interrupt(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "build_parser", interrupt)
    cli_cases.fails(capsys, ["erase"], "interrupted; nothing was written", rc=130)


_SLOW_WRITE = r"""
import os, sys, time
real = os.fdopen
def slow(fd, *a, **k):
    f = real(fd, *a, **k)
    name = os.readlink(f"/proc/self/fd/{fd}")
    if os.path.basename(name).startswith(".ws-"):
        print("TEMP", name, flush=True)
        time.sleep(120)                  # the signal arrives while the temp file is being written
    return f
os.fdopen = slow
from weightsmith.core.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.parametrize("signame", ["SIGTERM", "SIGHUP", "SIGINT"])
def test_a_signal_during_the_write_removes_the_temp_file_and_keeps_the_old_output(
    signame, cli_cases, tiny_checkpoints, tokenizer_dir, tmp_path
):
    import signal
    import subprocess
    import sys

    out = tmp_path / "o.safetensors"
    out.write_bytes(b"previous output")
    argv = [str(a) for a in cli_cases.erase(tiny_checkpoints["sd1"], tokenizer_dir, out, "--format", "lora")]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    sig = getattr(signal, signame)

    def default_disposition():  # as from a terminal: under ``nohup`` SIGHUP is ignored, and the CLI keeps it so
        signal.signal(sig, signal.SIG_DFL)

    p = subprocess.Popen(
        [sys.executable, "-c", _SLOW_WRITE, *argv],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        preexec_fn=default_disposition,
    )
    try:
        line = p.stdout.readline()  # blocks until the temp file exists
        assert line.startswith("TEMP"), (line, p.stderr.read() if p.poll() is not None else "")
        tmp = line.split(None, 1)[1].strip()
        assert os.path.exists(tmp) and os.path.basename(tmp).startswith(".ws-")
        p.send_signal(sig)
        rc = p.wait(120)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    err = p.stderr.read()
    assert rc == 128 + sig, err
    assert "Traceback" not in err and "nothing was written" in err
    assert not os.path.exists(tmp) and cli_cases.no_temp(tmp_path)
    assert out.read_bytes() == b"previous output"
