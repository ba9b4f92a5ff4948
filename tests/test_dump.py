"""`grokscope dump`: resume after a real SIGKILL, bad input, and the CLI."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import zarr

from grokscope import AttentionSpec, DumpError, RecordSpec, dump, open_store
from grokscope.cli import main

from dumps import WORDS, assert_same_arrays, prompts_file, store_arrays  # noqa: E402 (tests/dumps.py)



def _assert_same_store(a, b):
    arrays_a, attrs_a = store_arrays(a)
    arrays_b, attrs_b = store_arrays(b)
    assert_same_arrays(arrays_a, arrays_b)
    volatile = {"created", "finished"}
    assert {k: v for k, v in attrs_a.items() if k not in volatile} == \
        {k: v for k, v in attrs_b.items() if k not in volatile}


RECORD = "routing,attention:layers=1:heads=0-1:format=topk:k=4"


def _cli(args, **kw):
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    return subprocess.Popen([sys.executable, "-m", "grokscope.cli", "dump", *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


@pytest.mark.slow
def test_sigkill_mid_run_resumes_to_the_identical_store(tmp_path, tiny_model_dir):
    prompts = prompts_file(tmp_path / "p.jsonl", 96)
    common = ["--prompts", str(prompts), "--checkpoint", str(tiny_model_dir), "--record", RECORD,
              "--batch-size", "2", "--max-len", "128"]
    reference = tmp_path / "reference.zarr"
    proc = _cli(common + ["--out", str(reference)])
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err

    killed = tmp_path / "killed.zarr"
    proc = _cli(common + ["--out", str(killed)])
    deadline = time.time() + 300
    while time.time() < deadline:
        time.sleep(0.02)
        if not (killed / "done" / "zarr.json").exists():
            continue
        done = zarr.open_array(str(killed / "done"), mode="r")[...]
        if 10 <= done.sum() < len(done) // 2:
            os.kill(proc.pid, signal.SIGKILL)
            break
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL, "the dump finished before it could be killed"

    # a store being written: only completed sequences are visible, status in_progress
    partial = open_store(str(killed))
    done = zarr.open_array(str(killed / "done"), mode="r")[...]
    assert partial.attrs["status"] == "in_progress"
    assert 0 < partial.sizes["sequence"] == done.sum() < 96
    assert (partial["length"].values > 0).all()

    proc = _cli(common + ["--out", str(killed)])
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err
    assert "of 96 sequences written" in out
    written = int(out.split(": ")[1].split(" of ")[0])
    assert written == 96 - done.sum()  # each sequence exactly once
    assert zarr.open_group(str(killed), mode="r").attrs["status"] == "complete"
    _assert_same_store(reference, killed)


def test_failed_write_leaves_the_store_resumable(tmp_path, tiny_model_dir, monkeypatch):
    import grokscope.store as store
    from grokscope.store import writer

    prompts = prompts_file(tmp_path / "p.jsonl", 12)
    kwargs = dict(checkpoint=tiny_model_dir, batch_size=2, max_len=128, progress=False)
    dump(prompts, tmp_path / "reference.zarr", **kwargs)

    real = writer.write_batch

    def failing(arrays, values, row0, n_valid, *rest):
        if row0 >= 6:
            raise OSError(28, "No space left on device")
        return real(arrays, values, row0, n_valid, *rest)

    monkeypatch.setattr(writer, "write_batch", failing)
    with pytest.raises(store.StoreError, match="No space left on device.*resumable"):
        dump(prompts, tmp_path / "full.zarr", **kwargs)
    monkeypatch.setattr(writer, "write_batch", real)
    done = zarr.open_array(str(tmp_path / "full.zarr" / "done"), mode="r")[...]
    assert done[:6].all() and not done[6:].any()
    summary = dump(prompts, tmp_path / "full.zarr", **kwargs)
    assert summary.sequences_written == 6
    _assert_same_store(tmp_path / "reference.zarr", tmp_path / "full.zarr")


def test_a_store_of_another_dump_is_refused(tmp_path, tiny_model_dir):
    prompts = prompts_file(tmp_path / "p.jsonl", 4)
    kwargs = dict(checkpoint=tiny_model_dir, batch_size=2, max_len=128, progress=False)
    dump(prompts, tmp_path / "s.zarr", **kwargs)
    before = store_arrays(tmp_path / "s.zarr")
    with pytest.raises(DumpError, match=r"different dump; not resuming: record_spec: store has .*'attention': None"):
        dump(prompts, tmp_path / "s.zarr", record=RecordSpec(attention=AttentionSpec()), **kwargs)
    with pytest.raises(DumpError, match="batch_size: store has 2, this run has 4"):
        dump(prompts, tmp_path / "s.zarr", **{**kwargs, "batch_size": 4})
    prompts_file(prompts, 4, seed=1)
    with pytest.raises(DumpError, match="prompts file's contents differ"):
        dump(prompts, tmp_path / "s.zarr", **kwargs)
    after = store_arrays(tmp_path / "s.zarr")
    for name in before[0]:
        np.testing.assert_array_equal(before[0][name], after[0][name])


def test_output_path_that_is_not_a_store(tmp_path, tiny_model_dir):
    prompts = prompts_file(tmp_path / "p.jsonl", 2)
    (tmp_path / "notes.txt").write_text("keep me")
    with pytest.raises(DumpError, match="exists and is not a zarr store"):
        dump(prompts, tmp_path / "notes.txt", checkpoint=tiny_model_dir, progress=False)
    (tmp_path / "dir.zarr").mkdir()
    (tmp_path / "dir.zarr" / "data.bin").write_bytes(b"x")
    with pytest.raises(DumpError, match="exists and is not a zarr store"):
        dump(prompts, tmp_path / "dir.zarr", checkpoint=tiny_model_dir, progress=False)
    assert (tmp_path / "notes.txt").read_text() == "keep me"
    assert (tmp_path / "dir.zarr" / "data.bin").read_bytes() == b"x"


@pytest.mark.parametrize("content,suffix,message", [
    (None, ".txt", "prompts file not found"),
    (b"", ".txt", "no prompts"),
    (b"\n  \n", ".txt", "no prompts"),
    (b"fine\n\xff\xfe bad\n", ".txt", r"p\.txt:2: not valid UTF-8"),
    (b'{"text": "a"}\n{"txt": "b"}\n', ".jsonl", r'p\.jsonl:2: expected an object with a string "text"'),
    (b'{"text": "a"}\nnot json\n', ".jsonl", r"p\.jsonl:2: not valid JSON"),
    (b'{"text": "a", "label": "x"}\n{"text": "b"}\n', ".jsonl", r"p\.jsonl:2: missing metadata fields \['label'\]"),
    (b'{"text": "a", "tokens": 1}\n', ".jsonl", r"p\.jsonl:1: field name 'tokens': reserved by the store"),
    (b"a\n", ".csv", "expected a .txt"),
])
def test_bad_prompt_files_are_named(tmp_path, tiny_model_dir, content, suffix, message):
    path = tmp_path / f"p{suffix}"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(DumpError, match=message):
        dump(path, tmp_path / "s.zarr", checkpoint=tiny_model_dir, progress=False)
    assert not (tmp_path / "s.zarr").exists()


def test_blank_lines_are_skipped_and_counted(tmp_path, tiny_model_dir, capsys):
    path = tmp_path / "p.txt"
    path.write_text("first prompt\n\n   \nsecond prompt\n")
    summary = dump(path, tmp_path / "s.zarr", checkpoint=tiny_model_dir, max_len=128)
    assert summary.sequences == 2
    assert "skipped 2 blank lines" in capsys.readouterr().err
    assert list(open_store(str(tmp_path / "s.zarr"))["prompt"].values) == ["first prompt", "second prompt"]


def test_too_long_prompts_error_or_truncate(tmp_path, tiny_model_dir):
    from grokscope import Tokenizer

    tok = Tokenizer(tiny_model_dir / "tokenizer.model")
    long_text = " ".join(WORDS * 3)
    path = tmp_path / "p.txt"
    path.write_text("short one\n" + long_text + "\n")
    with pytest.raises(DumpError, match=r"p\.txt:2: \d+ tokens, longer than max_len 16"):
        dump(path, tmp_path / "s.zarr", checkpoint=tiny_model_dir, max_len=16, progress=False)
    ids = tok.encode(long_text)
    for side, expected in (("left", ids[-16:]), ("right", ids[:16])):
        dump(path, tmp_path / f"{side}.zarr", checkpoint=tiny_model_dir, max_len=16, truncate=side, progress=False)
        ds = open_store(str(tmp_path / f"{side}.zarr"))
        assert list(ds["tokens"].values[1]) == expected and ds["length"].values[1] == 16


def test_cli_dump_end_to_end(tmp_path, tiny_model_dir, capsys):
    prompts = prompts_file(tmp_path / "p.jsonl", 5)
    out = tmp_path / "s.zarr"
    rc = main(["dump", "--prompts", str(prompts), "--out", str(out), "--checkpoint", str(tiny_model_dir),
               "--record", "routing,residual:layers=0,1", "--batch-size", "2", "--max-len", "128", "--mesh", "2x4"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert "5 sequences" in captured.out and "MB written" in captured.out
    assert f"store: {out}" in captured.out and "residual " in captured.out
    assert "layer 1: expert" in captured.out  # first look at routing by label
    assert "tok/s" in captured.err and "5/5" in captured.err  # the progress bar's last state
    ds = open_store(str(out))
    assert list(ds["residual_layer"].values) == [0, 1] and list(ds["label"].values) == ["a", "b", "a", "b", "a"]
    rc = main(["dump", "--prompts", str(prompts), "--out", str(out), "--checkpoint", str(tiny_model_dir),
               "--record", "attention:format=bogus"])
    assert rc == 1 and "attention format: expected one of" in capsys.readouterr().err


def test_a_dump_on_a_mesh_writes_every_row(tmp_path, tiny_model_dir):
    from grokscope import make_mesh

    prompts = prompts_file(tmp_path / "p.jsonl", 7)
    kwargs = dict(checkpoint=tiny_model_dir, batch_size=4, max_len=128, progress=False,
                  record=RecordSpec(attention=AttentionSpec(format="topk", k=3)))
    dump(prompts, tmp_path / "one.zarr", **kwargs)
    dump(prompts, tmp_path / "mesh.zarr", mesh=make_mesh(data=2, model=4), **kwargs)
    one, mesh = open_store(str(tmp_path / "one.zarr")), open_store(str(tmp_path / "mesh.zarr"))
    valid = np.arange(one.sizes["position"])[None, :] < one["length"].values[:, None]
    assert (mesh["expert_index"].values[valid] >= 0).all()  # rows split over `data` all written
    np.testing.assert_array_equal(one["expert_index"].values, mesh["expert_index"].values)
    np.testing.assert_allclose(one["router_logits"].values, mesh["router_logits"].values, atol=1e-4)
    np.testing.assert_array_equal(one["attn_topk_index"].values, mesh["attn_topk_index"].values)


def test_a_run_killed_while_creating_the_store_leaves_nothing_half_made(tmp_path, tiny_model_dir):
    prompts = prompts_file(tmp_path / "p.jsonl", 3)
    # what a run killed while creating leaves: its staging directory, marked, its lock released
    staging = tmp_path / ".s.zarr.creating-999999-0123456789ab"
    (staging / "store").mkdir(parents=True)
    (staging / "store" / "zarr.json").write_text("{}")
    (staging / "grokscope-staging.json").write_text(json.dumps({"kind": "grokscope dump staging directory"}))
    summary = dump(prompts, tmp_path / "s.zarr", checkpoint=tiny_model_dir, max_len=128, progress=False)
    assert summary.sequences == 3 and not staging.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.jsonl", "s.zarr"]
    ds = open_store(str(tmp_path / "s.zarr"))
    assert ds.attrs["status"] == "complete" and ds.sizes["vocab"] > 0 and ds["vocab_piece"].values[0] != ""
