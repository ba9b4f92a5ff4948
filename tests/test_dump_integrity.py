"""`grokscope dump` never mixes, loses or invents data: resuming checks the weights' contents,
a store is created atomically and exclusively and locked while written, nothing that the dump
did not make is deleted, and bad prompts or flags get a one-line error before any store exists."""

import errno
import fcntl
import importlib
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import zarr

from grokscope import DumpError, dump, open_store
from grokscope.cli import main
from grokscope.store import staging as store_staging

from dumps import assert_same_arrays, prompts_file, store_arrays  # noqa: E402 (tests/dumps.py)

dump_module = importlib.import_module("grokscope.dump")  # the module (grokscope.dump is the function)

ROUTER = "transformer/decoder_layer_1/router/w"


def _prompts(path, n, seed=0):
    return prompts_file(path, n, seed, max_words=12)


def _leftovers(directory):
    """Staging directories of dumps beside stores in `directory`."""
    return sorted(p.name for p in directory.iterdir() if ".creating-" in p.name)


def _error_line(capsys_or_text):
    text = capsys_or_text if isinstance(capsys_or_text, str) else capsys_or_text.readouterr().err
    lines = [line for line in text.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), text
    assert "Traceback" not in text
    return lines[0]


@pytest.fixture
def model_copy(tmp_path, tiny_model_dir):
    """A copy of the tiny model that a test may change."""
    return shutil.copytree(tiny_model_dir, tmp_path / "model")


# 1. Resuming with other weights --------------------------------------------------------------


def _interrupt(out, rows):
    """What a run killed before these rows' batches were written leaves: their flags False."""
    group = zarr.open_group(str(out), mode="r+")
    done = group["done"][...]
    done[rows] = False
    group["done"][...] = done
    group.attrs.update({"status": "in_progress", "finished": None})


def _change_router(checkpoint, config, params):
    """Rewrites the checkpoint with other router weights (every file keeps its size)."""
    from grokscope import save_params

    module, name = ROUTER.rsplit("/", 1)
    changed = {m: dict(v) for m, v in params.items()}
    changed[module][name] = np.asarray(params[module][name]) + np.float32(1e-3)
    save_params(changed, checkpoint, config)


def test_the_store_records_every_tensors_digest(tmp_path, model_copy, tiny_config):
    import xxhash

    from grokscope.checkpoint import tensor_path
    from grokscope.forward import param_shapes

    out = tmp_path / "s.zarr"
    dump(_prompts(tmp_path / "p.jsonl", 2), out, checkpoint=model_copy, max_len=64, progress=False)
    content = zarr.open_group(str(out), mode="r").attrs["checkpoint_content"]
    paths = list(param_shapes(tiny_config))
    assert content["algorithm"] == "xxh3_128" and sorted(content["tensors"]) == sorted(paths)
    for index, path in enumerate(paths):
        assert content["tensors"][path] == xxhash.xxh3_128(tensor_path(model_copy, index).read_bytes()).hexdigest()
    assert len(content["digest"]) == 32 and content["digest"] not in content["tensors"].values()


def test_resume_with_other_weights_is_refused_naming_the_tensor(tmp_path, model_copy, tiny_config, tiny_params,
                                                                capsys):
    from grokscope.checkpoint import checkpoint_identity

    prompts = _prompts(tmp_path / "p.jsonl", 6)
    kwargs = dict(checkpoint=model_copy, batch_size=2, max_len=64, progress=False)
    reference = tmp_path / "reference.zarr"
    dump(prompts, reference, **kwargs)
    out = tmp_path / "s.zarr"
    dump(prompts, out, **kwargs)
    _interrupt(out, slice(2, 6))
    before = store_arrays(out)
    original = model_copy.with_name("original")
    shutil.copytree(model_copy, original)
    cheap = checkpoint_identity(model_copy)

    _change_router(model_copy, tiny_config, tiny_params)
    assert checkpoint_identity(model_copy) == cheap  # the same file names and sizes: only contents differ
    with pytest.raises(DumpError, match=f"other weights.*tensor {ROUTER} differs.*the store is untouched"):
        dump(prompts, out, **kwargs)
    rc = main(["dump", "--prompts", str(prompts), "--out", str(out), "--checkpoint", str(model_copy),
               "--batch-size", "2", "--max-len", "64", "--quiet"])
    assert rc == 1 and f"tensor {ROUTER} differs" in _error_line(capsys)
    after = store_arrays(out)
    assert_same_arrays(before[0], after[0])
    assert before[1] == after[1]

    # the weights it was written with resume it to the uninterrupted store
    shutil.rmtree(model_copy)
    shutil.copytree(original, model_copy)
    summary = dump(prompts, out, **kwargs)
    assert summary.sequences_written == 4
    assert_same_arrays(store_arrays(reference)[0], store_arrays(out)[0])


def test_a_store_without_recorded_contents_resumes_only_when_complete(tmp_path, model_copy):
    prompts = _prompts(tmp_path / "p.jsonl", 4)
    kwargs = dict(checkpoint=model_copy, batch_size=2, max_len=64, progress=False)
    out = tmp_path / "s.zarr"
    dump(prompts, out, **kwargs)
    group = zarr.open_group(str(out), mode="r+")
    del group.attrs["checkpoint_content"]  # as a store written before contents were recorded
    assert "checkpoint_content" not in zarr.open_group(str(out), mode="r").attrs
    assert dump(prompts, out, **kwargs).sequences_written == 0  # complete: nothing to write, nothing to check
    _interrupt(out, slice(2, 4))
    before = store_arrays(out)
    with pytest.raises(DumpError, match="does not record the contents of the checkpoint.*untouched"):
        dump(prompts, out, **kwargs)
    after = store_arrays(out)
    assert_same_arrays(before[0], after[0])
    assert before[1] == after[1]


# 2. Creation: atomic, exclusive, locked ------------------------------------------------------

_RACER = textwrap.dedent("""
    import os, sys, time
    from pathlib import Path

    import importlib

    staging = importlib.import_module("grokscope.store.staging")
    rename = staging.rename_noreplace

    def rendezvous(source, target):
        # both runs have built their whole store in staging before either renames it
        here = Path(os.environ["RACE_DIR"])
        (here / f"ready-{os.getpid()}").touch()
        deadline = time.monotonic() + 300
        while len(list(here.glob("ready-*"))) < 2 and time.monotonic() < deadline:
            time.sleep(0.005)
        return rename(source, target)

    if os.environ.get("RACE_DIR"):
        staging.rename_noreplace = rendezvous
    from grokscope.cli import main
    sys.exit(main(sys.argv[1:]))
""")


def _racer(args, race_dir=None):
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu"}
    env.pop("RACE_DIR", None)
    if race_dir is not None:
        env["RACE_DIR"] = str(race_dir)
    return subprocess.Popen([sys.executable, "-c", _RACER, "dump", *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


@pytest.mark.slow
def test_two_dumps_started_at_once_make_one_whole_store(tmp_path, tiny_model_dir):
    prompts = _prompts(tmp_path / "p.jsonl", 4)
    common = ["--prompts", str(prompts), "--checkpoint", str(tiny_model_dir), "--batch-size", "2",
              "--max-len", "32", "--quiet"]
    reference = tmp_path / "reference.zarr"
    dump(prompts, reference, checkpoint=tiny_model_dir, batch_size=2, max_len=32, progress=False)
    expected = store_arrays(reference)
    volatile = {"created", "finished"}
    for trial in range(4):
        where = tmp_path / f"trial{trial}"
        where.mkdir()
        out = where / "s.zarr"
        # trials 0-1 meet before renaming (both stores built in staging); 2-3 race freely
        race_dir = where / "race" if trial < 2 else None
        if race_dir is not None:
            race_dir.mkdir()
        procs = [_racer(common + ["--out", str(out)], race_dir) for _ in range(2)]
        results = [(p.pid, *p.communicate(timeout=600), p.returncode) for p in procs]
        if race_dir is not None:
            shutil.rmtree(race_dir)
        winners = [r for r in results if r[3] == 0 and "4 sequences," in r[1]]
        assert len(winners) == 1, results
        for pid, stdout, stderr, rc in results:
            assert "Traceback" not in stderr, stderr
            if (pid, stdout, stderr, rc) in winners:
                continue
            if rc == 0:  # came after the winner had finished: a resumer with nothing left to write
                assert "0 of 4 sequences written" in stdout and "status complete" in stdout, stdout
            else:
                assert rc == 1
                line = _error_line(stderr)
                assert f"{out} is being written by another dump" in line and "nothing was changed" in line
                if sys.platform.startswith("linux"):
                    assert f"(pid {winners[0][0]})" in line
        assert sorted(p.name for p in where.iterdir()) == ["s.zarr"]  # no staging directory left
        arrays, attrs = store_arrays(out)
        assert attrs["status"] == "complete"
        assert_same_arrays(expected[0], arrays)
        assert {k: v for k, v in attrs.items() if k not in volatile} == \
            {k: v for k, v in expected[1].items() if k not in volatile}
    # a later run finds the store complete
    out = tmp_path / "trial0" / "s.zarr"
    proc = subprocess.run([sys.executable, "-m", "grokscope.cli", "dump", *common, "--out", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0 and "0 of 4 sequences written" in proc.stdout and "status complete" in proc.stdout


def _hold_lock(path):
    """Takes the lock a running dump holds on `path` (a store or a staging directory)."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    return fd


def test_a_store_being_written_is_refused_and_unchanged(tmp_path, tiny_model_dir, capsys):
    prompts = _prompts(tmp_path / "p.jsonl", 4)
    out = tmp_path / "s.zarr"
    kwargs = dict(checkpoint=tiny_model_dir, batch_size=2, max_len=32, progress=False)
    dump(prompts, out, **kwargs)
    _interrupt(out, slice(2, 4))
    before = store_arrays(out)
    listing = sorted(os.listdir(out))
    fd = _hold_lock(out)  # as the run writing it would
    try:
        with pytest.raises(DumpError, match=rf"is being written by another dump \(pid {os.getpid()}\)"):
            dump(prompts, out, **kwargs)
        rc = main(["dump", "--prompts", str(prompts), "--out", str(out), "--checkpoint", str(tiny_model_dir),
                   "--batch-size", "2", "--max-len", "32"])
        assert rc == 1 and "is being written by another dump" in _error_line(capsys)
    finally:
        os.close(fd)
    after = store_arrays(out)
    assert_same_arrays(before[0], after[0])
    assert before[1] == after[1] and sorted(os.listdir(out)) == listing
    assert dump(prompts, out, **kwargs).sequences_written == 2  # once released, it resumes


def test_the_store_holds_only_zarr_files_and_opens_without_warnings(tmp_path, tiny_model_dir):
    import warnings

    import xarray as xr

    out = tmp_path / "s.zarr"
    dump(_prompts(tmp_path / "p.jsonl", 3), out, checkpoint=tiny_model_dir, max_len=32, progress=False)
    group = zarr.open_group(str(out), mode="r")
    assert sorted(os.listdir(out)) == sorted(["zarr.json", *group.array_keys()])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert sorted(name for name, _ in group.members()) == sorted(group.array_keys())
        xr.open_zarr(str(out), consolidated=False, zarr_format=3).close()
        assert open_store(str(out)).sizes["sequence"] == 3


def test_stale_staging_is_removed_only_when_marked_and_unlocked(tmp_path, tiny_model_dir):
    marker = json.dumps({"kind": "grokscope dump staging directory", "pid": 999999})

    def staging(name, marked):
        path = tmp_path / name
        (path / "store").mkdir(parents=True)
        (path / "store" / "zarr.json").write_text("{}")
        if marked:
            (path / "grokscope-staging.json").write_text(marker)
        return path

    stale = staging(".s.zarr.creating-999999-aaaaaaaaaaaa", marked=True)
    live = staging(".s.zarr.creating-999998-bbbbbbbbbbbb", marked=True)
    unmarked = staging(".s.zarr.creating-999997-cccccccccccc", marked=False)
    other = staging(".t.zarr.creating-999996-dddddddddddd", marked=True)  # another store's
    fd = _hold_lock(live)  # its creator is still running
    try:
        dump(_prompts(tmp_path / "p.jsonl", 2), tmp_path / "s.zarr", checkpoint=tiny_model_dir, max_len=32,
             progress=False)
    finally:
        os.close(fd)
    assert not stale.exists()
    assert live.exists() and unmarked.exists() and other.exists()
    assert (unmarked / "store" / "zarr.json").read_text() == "{}"


def test_an_existing_empty_directory_is_not_replaced(tmp_path, tiny_model_dir):
    out = tmp_path / "s.zarr"
    out.mkdir()
    with pytest.raises(DumpError, match="exists and is not a zarr store"):
        dump(_prompts(tmp_path / "p.jsonl", 2), out, checkpoint=tiny_model_dir, max_len=32, progress=False)
    assert out.is_dir() and not any(out.iterdir()) and _leftovers(tmp_path) == []
    # the rename that publishes a store refuses an empty directory too (a plain rename replaces it)
    source = tmp_path / "built"
    source.mkdir()
    (source / "zarr.json").write_text("{}")
    with pytest.raises(OSError) as caught:
        store_staging.rename_noreplace(source, out)
    assert caught.value.errno == errno.EEXIST
    assert (source / "zarr.json").exists() and not any(out.iterdir())


def test_a_store_that_cannot_be_created_leaves_nothing(tmp_path, tiny_model_dir, capsys):
    (tmp_path / "file").write_text("keep")
    out = tmp_path / "file" / "s.zarr"  # its parent is a file
    rc = main(["dump", "--prompts", str(_prompts(tmp_path / "p.jsonl", 2)), "--out", str(out),
               "--checkpoint", str(tiny_model_dir), "--max-len", "32", "--quiet"])
    assert rc == 1 and f"cannot create {out}" in _error_line(capsys)
    assert (tmp_path / "file").read_text() == "keep" and _leftovers(tmp_path) == []


def test_a_run_killed_after_its_first_batch_resumes_to_the_identical_store(tmp_path, tiny_model_dir):
    import time

    prompts = _prompts(tmp_path / "p.jsonl", 60)
    kwargs = dict(checkpoint=tiny_model_dir, batch_size=2, max_len=32, progress=False)
    reference = tmp_path / "reference.zarr"
    dump(prompts, reference, **kwargs)
    out = tmp_path / "s.zarr"
    proc = _racer(["--prompts", str(prompts), "--out", str(out), "--checkpoint", str(tiny_model_dir),
                   "--batch-size", "2", "--max-len", "32", "--quiet"])
    try:
        while proc.poll() is None:  # until the first batch's flags are written
            if (out / "done" / "zarr.json").exists() and zarr.open_array(str(out / "done"), mode="r")[...].any():
                os.kill(proc.pid, signal.SIGKILL)
                break
            time.sleep(0.01)
    finally:
        proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL, "the dump finished before it could be killed"
    assert zarr.open_group(str(out), mode="r").attrs["status"] == "in_progress"
    summary = dump(prompts, out, **kwargs)
    assert summary.resumed and 0 < summary.sequences_written < 60
    assert_same_arrays(store_arrays(reference)[0], store_arrays(out)[0])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.jsonl", "reference.zarr", "s.zarr"]


# 3. Nothing the dump did not make is deleted -------------------------------------------------


def test_a_users_creating_directory_is_kept(tmp_path, tiny_model_dir):
    mine = tmp_path / "s.zarr.creating"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    dump(_prompts(tmp_path / "p.jsonl", 2), tmp_path / "s.zarr", checkpoint=tiny_model_dir, max_len=32,
         progress=False)
    assert (mine / "notes.txt").read_text() == "mine"


# 4. Prompts ----------------------------------------------------------------------------------


def _dump_cli(tmp_path, prompts, *extra, checkpoint):
    return main(["dump", "--prompts", str(prompts), "--out", str(tmp_path / "s.zarr"), "--checkpoint",
                 str(checkpoint), "--quiet", *extra])


def _assert_refused(tmp_path, capsys, rc, *expected):
    line = _error_line(capsys)
    assert rc == 1
    for text in expected:
        assert text in line, line
    assert not (tmp_path / "s.zarr").exists() and _leftovers(tmp_path) == []
    return line


@pytest.mark.parametrize("lines,expected", [
    (['{"text": "a", "n": 9223372036854775808}'], ["p.jsonl:1: field 'n'", "does not fit in a 64-bit integer"]),
    (['{"text": "a", "n": 1}', '{"text": "b", "n": -9223372036854775809}'],
     ["p.jsonl:2: field 'n'", "-9223372036854775809 does not fit"]),
    (['{"text": "a", "x": NaN}'], ["p.jsonl:1: field 'x'", "nan is not a finite number"]),
    (['{"text": "a", "x": -Infinity}'], ["p.jsonl:1: field 'x'", "-inf is not a finite number"]),
    (['{"text": "a", "x": 1e400}'], ["p.jsonl:1: field 'x'", "inf is not a finite number"]),
    (['{"text": "a", "x": 0.5}', '{"text": "b", "x": 9007199254740993}'],
     ["p.jsonl:2: field 'x'", "cannot be stored exactly in this field's float64 column"]),
    (['{"text": "a", "a/b": 1}'], ["p.jsonl:1: field name 'a/b'", "path separator"]),
    (['{"text": "a", "a\\\\b": 1}'], ["p.jsonl:1: field name 'a\\\\b'", "path separator"]),
    (['{"text": "a", "": 1}'], ["p.jsonl:1: field name ''", "an empty name"]),
    (['{"text": "a", "zarr.json": 1}'], ["p.jsonl:1: field name 'zarr.json'", "reserved"]),
    (['{"text": "a", "..": 1}'], ["p.jsonl:1: field name '..'", "starts with '.'"]),
    (['{"text": "a", ".hidden": 1}'], ["p.jsonl:1: field name '.hidden'", "starts with '.'"]),
    (['{"text": "a", "__x": 1}'], ["p.jsonl:1: field name '__x'", "reserved by zarr"]),
    (['{"text": "a", "done": 1}'], ["p.jsonl:1: field name 'done'", "reserved by the store"]),
    (['{"text": "a", "Tokens": 1}'], ["p.jsonl:1: field name 'Tokens'", "reserved by the store"]),
    (['{"text": "a", "position": 1}'], ["p.jsonl:1: field name 'position'", "reserved by the store"]),
    (['{"text": "a", "label": "x"}', '{"text": "b", "label": "y", "Label": "z"}'],
     ["p.jsonl:2: field name 'Label'", "differs from field 'label' only in case"]),
    (['{"text": "a", "tab\\there": 1}'], ["p.jsonl:1: field name 'tab\\there'", "control character"]),
    (['{"text": "ok"}', '{"text": "bad \\ud800 text"}'],
     ["p.jsonl:2: field 'text'", "not valid Unicode (a lone surrogate \\ud800 at character 4)"]),
    (['{"text": "ok", "label": "x\\udfff"}'], ["p.jsonl:1: field 'label'", "lone surrogate \\udfff"]),
    (['{"text": "ok", "\\ud800": 1}'], ["p.jsonl:1: field name", "lone surrogate"]),
])
def test_bad_jsonl_is_named_before_any_store(tmp_path, tiny_model_dir, capsys, lines, expected):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("\n".join(lines) + "\n")
    _assert_refused(tmp_path, capsys, _dump_cli(tmp_path, prompts, checkpoint=tiny_model_dir), *expected)


def test_the_largest_int64_metadata_is_kept_exactly(tmp_path, tiny_model_dir):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"text": "a b", "n": 9223372036854775807}\n{"text": "c", "n": -9223372036854775808}\n')
    dump(prompts, tmp_path / "s.zarr", checkpoint=tiny_model_dir, max_len=32, progress=False)
    n = open_store(str(tmp_path / "s.zarr"))["n"].values
    assert n.dtype == np.int64 and n.tolist() == [2**63 - 1, -2**63]


@pytest.mark.parametrize("suffix", [".txt", ".jsonl"])
def test_a_byte_order_mark_is_not_text(tmp_path, tiny_model_dir, suffix):
    from grokscope import Tokenizer

    texts = ["the river ran to the sea", "and the sea was quiet"]
    lines = texts if suffix == ".txt" else [json.dumps({"text": t}) for t in texts]
    prompts = tmp_path / f"p{suffix}"
    prompts.write_bytes(b"\xef\xbb\xbf" + ("\n".join(lines) + "\n").encode())
    dump(prompts, tmp_path / "s.zarr", checkpoint=tiny_model_dir, max_len=32, progress=False)
    ds = open_store(str(tmp_path / "s.zarr"))
    tok = Tokenizer(tiny_model_dir / "tokenizer.model")
    assert list(ds["prompt"].values) == texts
    for row, text in enumerate(texts):
        ids = tok.encode(text)
        assert ds["length"].values[row] == len(ids) and list(ds["tokens"].values[row, :len(ids)]) == ids


def test_a_directory_of_prompts_is_named(tmp_path, tiny_model_dir, capsys):
    prompts = tmp_path / "prompts.jsonl"
    prompts.mkdir()
    rc = _dump_cli(tmp_path, prompts, checkpoint=tiny_model_dir)
    _assert_refused(tmp_path, capsys, rc, f"{prompts}: is a directory")


def test_an_unreadable_prompts_file_is_named(tmp_path, tiny_model_dir, capsys, monkeypatch):
    prompts = _prompts(tmp_path / "p.jsonl", 2)

    def refuse(file, *args, **kwargs):
        if os.fspath(file) == os.fspath(prompts):
            raise PermissionError(errno.EACCES, "Permission denied", os.fspath(file))
        return open(file, *args, **kwargs)

    monkeypatch.setattr(dump_module, "open", refuse, raising=False)
    rc = _dump_cli(tmp_path, prompts, checkpoint=tiny_model_dir)
    _assert_refused(tmp_path, capsys, rc, f"{prompts}: cannot read the prompts file (Permission denied)")


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their mode")
def test_a_prompts_file_without_read_permission_is_named(tmp_path, tiny_model_dir, capsys):
    prompts = _prompts(tmp_path / "p.jsonl", 2)
    prompts.chmod(0)
    try:
        rc = _dump_cli(tmp_path, prompts, checkpoint=tiny_model_dir)
    finally:
        prompts.chmod(0o644)
    _assert_refused(tmp_path, capsys, rc, f"{prompts}: cannot read the prompts file")


def test_texts_that_are_not_unicode_are_named_by_encode_prompts(tiny_model_dir):
    from grokscope import Tokenizer
    from grokscope.dump import encode_prompts

    tok = Tokenizer(tiny_model_dir / "tokenizer.model")
    with pytest.raises(DumpError, match=r"Session.run:2: the text is not valid Unicode \(a lone surrogate"):
        encode_prompts(tok, ["fine", "bad \udc80"], 32, None, [1, 2], "Session.run")
    with pytest.raises(DumpError, match="max_len: expected >= 1, got 0"):
        encode_prompts(tok, ["fine"], 0, "left", [1], "Session.run")


# 5. Flags ------------------------------------------------------------------------------------


@pytest.mark.parametrize("flags,expected", [
    (["--batch-size", "0"], "--batch-size: expected >= 1, got 0"),
    (["--max-len", "0"], "--max-len: expected >= 1, got 0"),
    (["--max-len", "-5"], "--max-len: expected >= 1, got -5"),
    (["--mesh", "8"], "--mesh: expected DATAxMODEL, two positive integers such as 1x8, got '8'"),
    (["--mesh", "abc"], "--mesh: expected DATAxMODEL, two positive integers such as 1x8, got 'abc'"),
    (["--mesh", "2x"], "--mesh: expected DATAxMODEL, two positive integers such as 1x8, got '2x'"),
    (["--mesh", "0x8"], "--mesh: expected sizes >= 1, got '0x8'"),
    (["--mesh", "4x4"], "--mesh 4x4: needs 16 devices, 8 available"),
    (["--record", "attention:k=abc"], "--record: attention k: expected an integer, got 'abc'"),
    (["--record", "attention:k=0"], "--record: attention k: expected >= 1, got 0"),
    (["--record", "attention:layers=x"], "--record: attention layers: expected 'all', numbers or ranges"),
    (["--record", "residual:layers=3-1"], "--record: residual layers: the range '3-1' is empty"),
    (["--record", "routing,routing"], "--record: routing given twice"),
])
def test_bad_flags_are_named_before_any_store(tmp_path, tiny_model_dir, capsys, flags, expected):
    rc = _dump_cli(tmp_path, _prompts(tmp_path / "p.jsonl", 2), *flags, checkpoint=tiny_model_dir)
    _assert_refused(tmp_path, capsys, rc, expected)


def test_a_file_that_is_not_a_tokenizer_is_named(tmp_path, tiny_model_dir, capsys):
    prompts = _prompts(tmp_path / "p.jsonl", 2)
    passwd = tmp_path / "passwd"
    passwd.write_text("root:x:0:0:root:/root:/bin/bash\n")
    rc = _dump_cli(tmp_path, prompts, "--tokenizer", str(passwd), checkpoint=tiny_model_dir)
    _assert_refused(tmp_path, capsys, rc, f"--tokenizer {passwd}: not a SentencePiece model (")
    rc = _dump_cli(tmp_path, prompts, "--tokenizer", str(tmp_path), checkpoint=tiny_model_dir)
    _assert_refused(tmp_path, capsys, rc, f"--tokenizer {tmp_path}: is a directory")


def test_a_batch_larger_than_the_prompts_is_the_prompt_count(tmp_path, tiny_model_dir, capsys):
    prompts = _prompts(tmp_path / "p.jsonl", 4)
    out = tmp_path / "s.zarr"
    args = ["dump", "--prompts", str(prompts), "--out", str(out), "--checkpoint", str(tiny_model_dir),
            "--max-len", "32", "--quiet"]
    assert main(args + ["--batch-size", "100000"]) == 0
    group = zarr.open_group(str(out), mode="r")
    assert group.attrs["batch_size"] == 4 and group["done"].chunks == (4,) and group["done"][...].all()
    capsys.readouterr()
    assert main(args + ["--batch-size", "8"]) == 0  # one batch of the four prompts, as before
    assert "0 of 4 sequences written" in capsys.readouterr().out
    assert main(args + ["--batch-size", "2"]) == 1
    assert "batch_size: store has 4, this run has 2" in _error_line(capsys)


def test_a_model_config_stored_before_the_architecture_fields_still_matches():
    from grokscope.config import GROK_TINY
    from grokscope.dump import _as_compared

    new_fields = ("attn_logit_softcap", "attn_temperature_len", "router_logit_softcap", "final_logit_softcap",
                  "rope_theta", "norm_eps", "gelu", "logits_dtype")
    stored = {k: v for k, v in GROK_TINY.to_dict().items() if k not in new_fields}
    assert _as_compared("model_config", stored) == _as_compared("model_config", GROK_TINY.to_dict())
    changed = {**stored, "emb_size": 64}
    assert _as_compared("model_config", changed) != _as_compared("model_config", GROK_TINY.to_dict())
