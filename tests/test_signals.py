"""Ctrl-C, SIGTERM and SIGHUP: one line, exit 128 + N, every temp file removed, what was written
completely named; docs/reliability.md, "File system"."""




def test_ctrl_c_after_the_output_was_written_says_so(cli_cases, tiny_checkpoints, tokenizer_dir, tmp_path, capsys, monkeypatch):
    import weightsmith.core.erase.cli as ecli

    def interrupt(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(ecli, "print_summary", interrupt)
    out = tmp_path / "o.safetensors"
    err = cli_cases.fails(capsys, cli_cases.erase(tiny_checkpoints["sd1"], tokenizer_dir, out, "--format", "lora"), str(out),
                 "written completely", rc=130)
    assert "nothing was written" not in err and out.exists()


def test_ctrl_c_during_start_up_is_one_line(cli_cases, capsys, monkeypatch):
    import weightsmith.core.cli as cli

    def interrupt(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "build_parser", interrupt)
    cli_cases.fails(capsys, ["erase"], "interrupted; nothing was written", rc=130)
