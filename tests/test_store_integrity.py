"""A damaged store is an error, never read as data: `open_store`, `grokscope verify`, and
`grokscope analyze`/`report` on stores damaged on disk, unfinished, or without routing."""

import json
import pickle
import shutil

import numpy as np
import pytest
import zarr

from grokscope import AttentionSpec, RecordSpec, StoreError, dump, open_store, verify_store
from grokscope.cli import main

WORDS = "the of and to in is was for on that with as by at from his an were are which this be".split()
RECORD = RecordSpec(attention=AttentionSpec(format="topk", k=3, layers=(0,), heads=(0, 1)))


def _prompts(path):
    rng = np.random.default_rng(0)
    texts = [" ".join(rng.choice(WORDS, size=n)) for n in (6, 9, 4, 12, 7)]
    texts[2] = " ".join(rng.choice(WORDS, size=120))  # sequence 2: longer than one chunk of 128 positions
    path.write_text("".join(json.dumps({"text": t, "label": ["a", "b"][i % 2]}) + "\n" for i, t in enumerate(texts)))
    return path


@pytest.fixture(scope="module")
def healthy(tmp_path_factory, tiny_model_dir):
    """A finished dump of 5 sequences in batches of 2 (sequence chunks c.0, c.1, c.2), max_len 160."""
    directory = tmp_path_factory.mktemp("integrity")
    prompts = _prompts(directory / "p.jsonl")
    dump(prompts, directory / "s.zarr", checkpoint=tiny_model_dir, record=RECORD, batch_size=2, max_len=160,
         truncate="right", progress=False)
    return directory / "s.zarr"


@pytest.fixture
def store(healthy, tmp_path):
    """A copy of the healthy store, to damage."""
    return shutil.copytree(healthy, tmp_path / "s.zarr")


def _fails_with(path, text, capsys, deep=False):
    """open_store raises a StoreError naming `text`; `grokscope verify` and `grokscope analyze`
    exit 1 with one-line errors naming it."""
    if not deep:
        with pytest.raises(StoreError, match=text.replace(".", r"\.")) as raised:
            open_store(str(path))
        assert str(path) in str(raised.value)
    capsys.readouterr()
    assert main(["verify", str(path)] + (["--deep"] if deep else [])) == 1
    captured = capsys.readouterr()
    errors = captured.err.splitlines()
    assert errors and all(line.startswith("error: ") for line in errors)
    assert any(text in line for line in errors), errors
    assert main(["analyze", str(path), "--permutations", "5"]) == 1
    captured = capsys.readouterr()
    assert len(captured.err.splitlines()) == 1 and text in captured.err, captured.err
    assert "Traceback" not in captured.err and "load CV" not in captured.out


def test_healthy_store_verifies_cheap_and_deep(healthy, capsys):
    assert verify_store(str(healthy)) == []
    assert verify_store(str(healthy), deep=True) == []
    assert main(["verify", str(healthy)]) == 0
    assert f"{healthy}: ok (5 sequences complete" in capsys.readouterr().out
    assert main(["verify", str(healthy), "--deep"]) == 0
    out = capsys.readouterr().out
    assert "decoded" in out and "ok" in out
    ds = open_store(str(healthy))
    assert ds.sizes["sequence"] == 5 and int(ds["length"][2]) > 128
    assert (ds["expert_index"].isel(sequence=2, position=slice(0, int(ds["length"][2]))).values >= 0).all()


def test_deleted_expert_index_chunk_is_an_error(store, capsys):
    (store / "expert_index" / "c.1.0.0.0").unlink()  # sequences 2 and 3, positions 0..127
    _fails_with(store, "expert_index/c.1.0.0.0", capsys)
    assert "sequences 2..3 are done" in verify_store(str(store))[0]


def test_chunks_a_sequence_needs_follow_its_length(store, capsys):
    # Sequence 2 is longer than 128 tokens: its batch wrote position chunk 1, which it needs.
    assert (store / "router_logits" / "c.1.1.0.0").exists()
    assert not (store / "router_logits" / "c.0.1.0.0").exists()  # a short batch never writes it
    (store / "router_logits" / "c.1.1.0.0").unlink()
    _fails_with(store, "router_logits/c.1.1.0.0", capsys)


def test_a_deleted_chunk_of_every_kind_of_array_is_named(store):
    for key in ["attn_topk_weight/c.2.0.0.0.0", "tokens/c.0.0", "length/c.1", "label/c.2", "vocab_piece/c.0",
                "expert/c/0"]:
        (store / key).unlink()
    problems = verify_store(str(store))
    for key in ["attn_topk_weight/c.2.0.0.0.0", "tokens/c.0.0", "length/c.1", "label/c.2", "vocab_piece/c.0",
                "expert/c/0"]:
        assert any(key in p for p in problems), (key, problems)
    assert len(problems) == 6
    with pytest.raises(StoreError, match=r"and 5 more problems"):
        open_store(str(store))


def test_missing_done_chunk_of_a_complete_store_is_an_error(store, capsys):
    (store / "done" / "c.1").unlink()  # would silently hide sequences 2 and 3
    _fails_with(store, "done/c.1", capsys)
    assert "status is complete" in verify_store(str(store))[0]


def test_a_complete_store_with_unfinished_sequences_is_an_error(store):
    zarr.open_array(str(store / "done"), mode="r+")[3] = False
    problems = verify_store(str(store))
    assert problems == ["done: 1 of 5 sequences not done (first: 3) in a store whose status is complete"]


def test_truncated_chunk_names_the_chunk(store, capsys):
    chunk = store / "expert_index" / "c.0.0.0.0"
    chunk.write_bytes(chunk.read_bytes()[:-7])
    _fails_with(store, "expert_index/c.0.0.0.0", capsys, deep=True)
    problems = verify_store(str(store), deep=True)
    assert len(problems) == 1 and "Blosc header declares" in problems[0]
    # the cheap check does not read data chunks; reading this one lazily names it
    ds = open_store(str(store))
    with pytest.raises(StoreError, match=r"expert_index: chunk expert_index/c\.0\.0\.0\.0"):
        ds["expert_index"].values
    ds["expert_gate"].values  # the others still read
    with pytest.raises(StoreError, match=r"expert_index/c\.0\.0\.0\.0"):  # as on a dask.distributed worker
        pickle.loads(pickle.dumps(ds))["expert_index"].values


def test_truncated_string_chunk_names_the_chunk(store, capsys):
    chunk = store / "prompt" / "c.1"
    chunk.write_bytes(chunk.read_bytes()[:-2])
    assert verify_store(str(store)) == []  # present; only reading finds it
    problems = verify_store(str(store), deep=True)
    assert len(problems) == 1 and problems[0].startswith("prompt: chunk prompt/c.1: ")
    with pytest.raises(StoreError, match=r"prompt/c\.1"):
        open_store(str(store))["prompt"].values


def test_corrupt_bytes_in_a_chunk_are_named_by_deep(store):
    chunk = store / "router_logits" / "c.2.0.0.0"
    data = bytearray(chunk.read_bytes())
    data[16:] = bytes(len(data) - 16)  # same length, header intact, payload gone
    chunk.write_bytes(bytes(data))
    problems = verify_store(str(store), deep=True)
    assert len(problems) == 1 and "router_logits: chunk router_logits/c.2.0.0.0 does not decode" in problems[0]


@pytest.mark.parametrize("file", ["expert_gate/zarr.json", "zarr.json"])
def test_corrupt_zarr_json_names_the_file(store, capsys, file):
    (store / file).write_text('{"zarr_format": 3, "node_type": ')
    _fails_with(store, f"{file}: not valid JSON", capsys)


def test_deleted_array_metadata_is_named(store, capsys):
    (store / "expert_gate" / "zarr.json").unlink()
    problems = verify_store(str(store))
    assert any(p.startswith("expert_gate: array missing") for p in problems), problems
    assert any(p.startswith("expert_gate/zarr.json missing:") for p in problems), problems
    _fails_with(store, "expert_gate", capsys)


@pytest.mark.parametrize("schema", [2, None])
def test_unknown_schema_is_an_error(store, capsys, schema):
    group = zarr.open_group(str(store), mode="r+")
    marker = dict(group.attrs["grokscope"])
    if schema is None:
        del marker["schema"]
    else:
        marker["schema"] = schema
    group.attrs["grokscope"] = marker
    _fails_with(store, f"grokscope.schema: expected 1, got {schema!r}", capsys)


def _unfinish(store, first_row):
    """Marks sequences first_row.. not done and deletes every chunk of their batches, as a
    store being written looks; status in_progress."""
    group = zarr.open_group(str(store), mode="r+")
    group.attrs["status"] = "in_progress"
    group["done"][first_row:] = False
    for name in group.array_keys():
        array = group[name]
        dims = array.metadata.dimension_names
        if "sequence" not in dims or name == "done":
            continue
        chunk = array.chunks[0]
        for path in (store / name).iterdir():
            if path.name.startswith("c.") and int(path.name.split(".")[1]) * chunk >= first_row:
                path.unlink()


def test_store_being_written_opens_with_its_finished_sequences(store, capsys):
    _unfinish(store, 2)
    assert verify_store(str(store), deep=True) == []
    assert main(["verify", str(store)]) == 0
    assert "2 sequences complete of 5, status in_progress" in capsys.readouterr().out
    ds = open_store(str(store))
    assert ds.sizes["sequence"] == 2
    assert (ds["expert_index"].isel(position=0).values >= 0).all()
    assert open_store(str(store), only_done=False).sizes["sequence"] == 5
    # a finished sequence whose chunk is gone is still an error
    (store / "expert_gate" / "c.0.0.0.0").unlink()
    with pytest.raises(StoreError, match=r"expert_gate/c\.0\.0\.0\.0 missing \(sequences 0\.\.1 are done\)"):
        open_store(str(store))


def test_analyze_with_zero_finished_sequences(store, capsys):
    _unfinish(store, 0)
    assert open_store(str(store)).sizes["sequence"] == 0
    assert main(["analyze", str(store)]) == 1
    err = capsys.readouterr().err
    assert err == f"error: {store}: 0 finished sequences (store status in_progress); nothing to analyze\n"
    assert main(["report", str(store), "-o", str(store.parent / "r.html")]) == 1
    assert "0 finished sequences" in capsys.readouterr().err


NO_ROUTING = [RecordSpec(routing=False, attention=AttentionSpec(format="head_mean", layers=(0,))),
              RecordSpec(routing=False)]


@pytest.mark.parametrize("record", NO_ROUTING, ids=["attention-only", "nothing"])
def test_analyze_and_report_without_routing(healthy, tmp_path, tiny_model_dir, capsys, record):
    out = tmp_path / "no-routing.zarr"
    dump(healthy.parent / "p.jsonl", out, checkpoint=tiny_model_dir, record=record, batch_size=2, max_len=160,
         truncate="right", progress=False)
    assert verify_store(str(out)) == []
    assert main(["analyze", str(out)]) == 1
    err = capsys.readouterr().err
    assert err == (f"error: {out}: no routing recorded (expert_index missing); "
                   f"dump with --record routing to analyze it\n")
    assert main(["report", str(out), "-o", str(tmp_path / "r.html")]) == 1
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and "no routing recorded (expert_index missing)" in err


def test_analyze_output_paths(healthy, tmp_path, capsys):
    target = tmp_path / "new" / "dir" / "s.json"
    assert main(["analyze", str(healthy), "--permutations", "5", "-o", str(target)]) == 0
    assert "repetition" in json.loads(target.read_text())["data_vars"]
    capsys.readouterr()
    # a wrong suffix is refused before any work
    assert main(["analyze", str(healthy), "-o", str(tmp_path / "s.txt")]) == 1
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == f"error: -o {tmp_path / 's.txt'}: expected a .json or .csv file\n"


def test_analyze_of_what_is_not_a_store(tmp_path, capsys):
    zarr.create_array(str(tmp_path / "plain.zarr"), shape=(3,), dtype="i4")
    assert main(["analyze", str(tmp_path / "plain.zarr")]) == 1
    err = capsys.readouterr().err
    assert err == f"error: {tmp_path / 'plain.zarr'}: a zarr array, not a grokscope store (a zarr group of arrays)\n"
    assert main(["verify", str(tmp_path / "absent.zarr")]) == 1
    assert "not a grokscope store" in capsys.readouterr().err


def test_memory_url_is_checked_too(healthy):
    import fsspec

    fs = fsspec.filesystem("memory")
    fs.put(str(healthy), "/integrity.zarr", recursive=True)
    try:
        assert verify_store("memory://integrity.zarr", deep=True) == []
        assert open_store("memory://integrity.zarr").sizes["sequence"] == 5
        fs.rm("/integrity.zarr/expert_index/c.1.0.0.0")
        with pytest.raises(StoreError, match=r"expert_index/c\.1\.0\.0\.0 missing"):
            open_store("memory://integrity.zarr")
    finally:
        fs.rm("/integrity.zarr", recursive=True)
