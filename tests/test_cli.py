import os
import shutil
import subprocess
import sys

import pytest

from grokscope.cli import main


def test_inspect_lists_and_validates_the_fixture(fixture_dir, capsys):
    assert main(["inspect", str(fixture_dir)]) == 0
    out = capsys.readouterr().out
    assert "transformer/decoder_layer_1/moe/linear_1/w" in out and "8 blocks" in out
    assert "26 tensors" in out and "all match the config" in out


def test_inspect_names_the_first_problem(tmp_path, fixture_dir, capsys):
    shutil.copytree(fixture_dir / "ckpt-0", tmp_path / "ckpt-0")
    (tmp_path / "ckpt-0" / "tensor00013_000").chmod(0o644)
    (tmp_path / "ckpt-0" / "tensor00013_000").write_bytes(b"\x80\x04garbage")
    assert main(["inspect", str(tmp_path), "--config", str(fixture_dir / "config.json")]) == 1
    err = capsys.readouterr().err
    assert "tensor00013_000: truncated or corrupt pickle" in err


def test_inspect_with_the_wrong_config(fixture_dir, tmp_path, capsys):
    import dataclasses
    import json

    from grokscope import TINY

    assert main(["inspect", str(fixture_dir), "--config", "small"]) == 1
    assert "24 of 50 tensor files missing" in capsys.readouterr().err
    wrong = tmp_path / "wrong.json"
    wrong.write_text(json.dumps(dataclasses.asdict(dataclasses.replace(TINY, num_kv_heads=4))))
    assert main(["inspect", str(fixture_dir), "--config", str(wrong)]) == 1
    assert ("tensor00005_000 (transformer/decoder_layer_0/multi_head_attention/key/w): weight: "
            "expected shape (64, 64), got (64, 32)") in capsys.readouterr().err


def test_inspect_without_a_config(tmp_path, capsys):
    (tmp_path / "ckpt-0").mkdir()
    assert main(["inspect", str(tmp_path)]) == 2
    assert "pass --config" in capsys.readouterr().err


def test_demo_runs_end_to_end(tmp_path):
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    result = subprocess.run([sys.executable, "-m", "grokscope.cli", "demo", "--preset", "tiny",
                             "--checkpoint-out", str(tmp_path / "ck")],
                            capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "(data=1, model=8)" in result.stdout and "top-2 gate mass" in result.stdout
    assert len(list((tmp_path / "ck" / "ckpt-0").iterdir())) == 26


def test_inspect_names_a_missing_file(tmp_path, fixture_dir, capsys):
    shutil.copytree(fixture_dir / "ckpt-0", tmp_path / "ckpt-0")
    (tmp_path / "ckpt-0" / "tensor00020_000").unlink()
    (tmp_path / "ckpt-0" / "notes.txt").write_text("not a tensor")
    assert main(["inspect", str(tmp_path), "--config", str(fixture_dir / "config.json")]) == 1
    assert "first tensor00020_000" in capsys.readouterr().err


@pytest.mark.parametrize("argv, named", [
    (["dump", "--prompts", "p.txt", "--out", "o.zarr", "--batch-size", "abc"], "'--batch-size': 'abc' is not a valid integer"),
    (["dump", "--prompts", "p.txt"], "Missing option '--out'"),
    (["dump", "--prompts", "p.txt", "--out", "o.zarr", "--truncate", "middle"], "'--truncate'"),
    (["analyze"], "Missing argument 'STORE'"),
    (["frobnicate"], "No such command 'frobnicate'"),
    (["verify", "s.zarr", "--deeep"], "No such option '--deeep'"),
])
def test_usage_errors_are_one_line_naming_the_flag(argv, named, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and named in err, err
    assert not (tmp_path / "o.zarr").exists()
