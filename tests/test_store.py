"""Records through the store: round trips, names, dims, attention invariants, URLs."""

import json

import numpy as np
import pytest
import zarr

from grokscope import AttentionSpec, RecordSpec, Session, dump, forward, open_store
from grokscope.record import QUANTITIES
from grokscope.store import StoreError

TEXTS = ["def add(a, b):\n    return a + b\n", "The quick brown fox jumps over the lazy dog.",
         "import os", "Lorem ipsum dolor sit amet, consectetur adipiscing elit, sed do eiusmod.",
         "x = [i * i for i in range(10)]"]
LABELS = ["code", "prose", "code", "prose", "code"]

SPECS = {  # every quantity in at least one; routing (the default record) rides along with full and topk
    "full": RecordSpec(attention=AttentionSpec(format="full")),
    "head_mean": RecordSpec(routing=False, attention=AttentionSpec(format="head_mean", layers=(1,), heads=(0, 3))),
    "topk": RecordSpec(attention=AttentionSpec(format="topk", k=5, layers=(0,), heads=(1, 2))),
    "residual_and_expert_outputs": RecordSpec(routing=False, residual=(0, 1), expert_outputs=(1,)),
}


@pytest.fixture(scope="module")
def session(tiny_model_dir):
    return Session(checkpoint=tiny_model_dir)


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("prompts") / "prompts.jsonl"
    path.write_text("".join(json.dumps({"text": t, "label": l, "n": i}) + "\n"
                            for i, (t, l) in enumerate(zip(TEXTS, LABELS))))
    return path


def test_golden_names_and_dimension_names(tmp_path, tiny_model_dir, prompts_file):
    spec = RecordSpec(attention=AttentionSpec(format="topk", k=3), residual="all")
    dump(prompts_file, tmp_path / "s.zarr", checkpoint=tiny_model_dir, record=spec, batch_size=2, max_len=96,
         progress=False)
    group = zarr.open_group(str(tmp_path / "s.zarr"), mode="r")
    dims = {name: tuple(group[name].metadata.dimension_names) for name in group.array_keys()}
    assert dims == {
        "tokens": ("sequence", "position"), "length": ("sequence",), "prompt": ("sequence",),
        "done": ("sequence",), "label": ("sequence",), "n": ("sequence",), "vocab_piece": ("vocab",),
        "router_logits": ("sequence", "position", "layer", "expert"),
        "expert_index": ("sequence", "position", "layer", "slot"),
        "expert_gate": ("sequence", "position", "layer", "slot"),
        "attn_topk_index": ("sequence", "attn_layer", "head", "query", "rank"),
        "attn_topk_weight": ("sequence", "attn_layer", "head", "query", "rank"),
        "residual": ("sequence", "position", "residual_layer", "hidden"),
        "layer": ("layer",), "expert": ("expert",), "slot": ("slot",), "attn_layer": ("attn_layer",),
        "head": ("head",), "residual_layer": ("residual_layer",),
    }
    for name in spec.names:
        assert group[name].attrs["long_name"] == QUANTITIES[name].long_name
        assert str(group[name].dtype) == QUANTITIES[name].dtype
    assert group["tokens"].chunks[0] == 2  # sequence chunks = batches
    assert group.attrs["status"] == "complete"
    assert group.attrs["record_spec"]["attention"]["layers"] == [0, 1]


@pytest.mark.parametrize("name", list(SPECS))
def test_every_record_spec_round_trips_through_the_store(tmp_path, session, prompts_file, name):
    spec = SPECS[name]
    summary = dump(prompts_file, tmp_path / "s.zarr", checkpoint=session._model.directory, record=spec,
                   batch_size=2, max_len=96, progress=False)
    assert summary.sequences == 5
    stored = open_store(str(tmp_path / "s.zarr"))
    assert RecordSpec.from_dict(stored.attrs["record_spec"]) == spec.resolved(session.config)
    live = session.run(TEXTS, record=spec, metadata={"label": LABELS, "n": list(range(5))})
    assert set(live.data_vars) == set(stored.data_vars)
    P = live.sizes["position"]
    for var in live.data_vars:
        a, b = live[var], stored[var]
        assert a.dims == b.dims, var
        assert a.dtype == b.dtype, var
        region = {d: slice(0, live.sizes[d]) for d in a.dims if d in ("position", "query", "key", "rank")}
        np.testing.assert_array_equal(a.values, b.isel(region).values, err_msg=var)
    # and the in-memory arrays are the forward's own records, cast to the store's dtypes
    tokens = stored["tokens"].values[:, :P]
    out = forward(session.params, session.config, tokens, record=spec)
    lengths = live["length"].values
    for key, value in out.record.items():
        target = live[key].values
        value = np.asarray(value)[tuple(slice(0, s) for s in target.shape)].astype(target.dtype)
        valid = _valid_mask(key, value.shape, lengths)
        np.testing.assert_array_equal(value[valid], target[valid], err_msg=key)
    unrecorded = forward(session.params, session.config, tokens, record=RecordSpec(routing=False))
    np.testing.assert_array_equal(np.asarray(out.logits), np.asarray(unrecorded.logits))


def _valid_mask(name, shape, lengths):
    """True where a recorded value is at a real (non-pad) position/query."""
    mask = np.ones(shape, bool)
    for axis, dim in enumerate(QUANTITIES[name].dims):
        if dim in ("position", "query"):
            idx = np.arange(shape[axis]).reshape([-1 if a == axis else 1 for a in range(len(shape))])
            mask &= idx < lengths.reshape([-1] + [1] * (len(shape) - 1))
    return mask


def test_full_attention_rows_sum_to_one_and_respect_masks(session):
    texts = ["one two three four five six", "hi"]
    ds = session.run(texts, record=RecordSpec(attention=AttentionSpec(format="full")))
    w = ds["attn_weights"].values.astype(np.float32)  # [S, A, H, Q, K]
    lengths = ds["length"].values
    P = ds.sizes["position"]
    causal = np.tril(np.ones((P, P), bool))
    for s, n in enumerate(lengths):
        valid_keys = np.arange(P) < n
        rows = w[s, :, :, :n]  # queries that are real tokens
        np.testing.assert_allclose(rows.sum(-1), 1.0, atol=2e-3)  # float16 storage
        allowed = causal[:n] & valid_keys[None, :]
        assert np.all(rows[..., ~allowed] == 0)


def test_topk_agrees_with_full(session):
    texts = ["alpha beta gamma delta epsilon zeta eta theta iota kappa"]
    full = session.run(texts, record=RecordSpec(attention=AttentionSpec(format="full")))
    top = session.run(texts, record=RecordSpec(attention=AttentionSpec(format="topk", k=4)))
    w = full["attn_weights"].values.astype(np.float32)
    index = top["attn_topk_index"].values
    weight = top["attn_topk_weight"].values.astype(np.float32)
    np.testing.assert_allclose(np.take_along_axis(w, index, axis=-1), weight, atol=1e-3)
    np.testing.assert_allclose(np.sort(w, axis=-1)[..., ::-1][..., :4], weight, atol=1e-3)
    mean = session.run(texts, record=RecordSpec(attention=AttentionSpec(format="head_mean")))
    np.testing.assert_allclose(mean["attn_weights_head_mean"].values.astype(np.float32), w.mean(axis=2), atol=1e-3)


def test_open_store_reads_file_and_memory_urls(tmp_path, tiny_model_dir, prompts_file):
    import fsspec

    path = tmp_path / "s.zarr"
    dump(prompts_file, path, checkpoint=tiny_model_dir, batch_size=2, max_len=96, progress=False)
    local = open_store(str(path))
    via_file = open_store(path.as_uri())
    fs = fsspec.filesystem("memory")
    fs.put(str(path), "/copy.zarr", recursive=True)
    via_memory = open_store("memory://copy.zarr")
    for ds in (via_file, via_memory):
        assert ds.sizes == local.sizes
        np.testing.assert_array_equal(ds["expert_index"].values, local["expert_index"].values)
        assert list(ds["label"].values) == LABELS
    fs.rm("/copy.zarr", recursive=True)


def test_open_store_refuses_what_is_not_a_store(tmp_path):
    with pytest.raises(StoreError, match="not a grokscope store"):
        open_store(str(tmp_path / "nothing-here.zarr"))
    zarr.open_group(str(tmp_path / "plain.zarr"), mode="w").create_array("x", shape=(2,), dtype="i4",
                                                                         dimension_names=("a",))
    with pytest.raises(StoreError, match="not a grokscope store"):
        open_store(str(tmp_path / "plain.zarr"))


def test_token_pieces_label_the_tokens(session):
    from grokscope import token_pieces

    ds = session.run("a b\nc")
    pieces = token_pieces(ds, 0, visible=False)
    assert "".join(pieces).replace("\u2581", " ").strip() == "a b c" or "".join(pieces).replace("\u2581", " ") \
        .replace("\n", " ").strip() == "a b c"
    assert session.tokenizer.ids_from_pieces(pieces) == list(ds["tokens"].values[0, : ds["length"].values[0]])


@pytest.mark.parametrize("where", ["local", "memory"])
def test_direct_chunk_writes_equal_zarrs_own(tmp_path, where):
    """write_batch encodes whole chunks itself; the stored objects must be the bytes zarr's
    pipeline writes for the same data: aligned batches, a last batch cut by the array's end
    (edge chunk padded with the fill value), and a block split inside a chunk (zarr's path)."""
    from grokscope.config import TINY
    from grokscope.store import create, layout, mask_padding, write_batch

    spec = RecordSpec(attention=AttentionSpec(format="topk", k=4))
    variables, coords = layout(TINY, spec, num_sequences=11, max_len=200, batch_size=4)
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 200, 11).astype(np.int32)
    values = {"tokens": rng.integers(0, 100, (11, 200)).astype(np.int32), "length": lengths,
              "done": np.ones(11, bool)}
    for name in spec.resolved(TINY).names:
        v = variables[name]
        values[name] = (rng.standard_normal(v.shape) * 4).astype(v.dtype)

    def make(label):
        store = str(tmp_path / f"{label}.zarr") if where == "local" else zarr.storage.MemoryStore()
        group = create(store, variables, coords, {"grokscope": {}})
        return group, {name: group[name].with_config({"write_empty_chunks": True}) for name in values}

    direct, direct_arrays = make("direct")
    for row0 in range(0, 11, 4):
        n = min(4, 11 - row0)
        write_batch(direct_arrays, {k: v[row0:row0 + 4] for k, v in values.items()}, row0, n)
    reference, reference_arrays = make("reference")
    for name, array in reference_arrays.items():
        block = values[name]
        if name != "length" and name != "done":
            block = mask_padding(name, block.copy(), lengths, [0] * block.ndim)
        array[...] = block

    def objects(group):
        from zarr.core.sync import sync

        store = group.store

        async def collect():
            keys = [k async for k in store.list() if "/c" in k and not k.endswith("zarr.json")]
            return {k: (await store.get(k, prototype=zarr.core.buffer.default_buffer_prototype())).to_bytes()
                    for k in keys}
        return sync(collect())

    got, want = objects(direct), objects(reference)
    assert sorted(got) == sorted(want) and len(got) > 20
    for key in want:
        assert got[key] == want[key], key
    # a block that splits a chunk (rows 1..2 of a 4-row chunk) goes through zarr and is read back exactly
    write_batch(direct_arrays, {k: v[1:3] * (2 if k not in ("length", "done") else 1) for k, v in values.items()},
                1, 2)
    expected = mask_padding("router_logits", values["router_logits"][1:3] * 2, lengths[1:3], [0] * 4)
    np.testing.assert_array_equal(direct_arrays["router_logits"][1:3], expected)
    np.testing.assert_array_equal(direct_arrays["router_logits"][0], reference_arrays["router_logits"][0])


def test_record_bytes_per_token_match_a_dump(tmp_path, tiny_model_dir, prompts_file):
    from grokscope.config import TINY
    from grokscope.store import record_bytes_per_token

    spec = RecordSpec(attention=AttentionSpec(format="topk", k=3, layers=(1,)), residual=(0,), expert_outputs=(1,))
    out = tmp_path / "sized.zarr"
    dump(prompts_file, out, checkpoint=tiny_model_dir, record=spec, batch_size=2, max_len=64, progress=False)
    group = zarr.open_group(str(out), mode="r")
    positions = 5 * 64  # sequences x max_len: every position has its record, pads included
    for name, per_token in record_bytes_per_token(TINY, spec, context=64).items():
        assert group[name].nbytes == per_token * positions, name
    full = record_bytes_per_token(TINY, RecordSpec(attention=AttentionSpec(format="full")), context=64)
    assert full["attn_weights"] == TINY.num_layers * TINY.num_q_heads * 64 * 2


def test_zarr_outside_the_tested_versions_takes_the_public_path(tmp_path, monkeypatch):
    """The fast chunk writer (zarr internals) and zarr's public path write the same store."""
    import zarr as zarr_module

    from grokscope import dump
    from grokscope.session import default_model_dir
    from grokscope.store import zarr_internals

    assert zarr_internals.SUPPORTED  # the installed zarr is one the fast path was tested with
    assert zarr_internals._release("3.2.0rc1") == (3, 2, 0) and zarr_internals._release("3.1.6") == (3, 1, 6)
    prompts = default_model_dir() / "examples.jsonl"
    dump(prompts, tmp_path / "fast.zarr", batch_size=16, progress=False)
    calls = []
    monkeypatch.setattr(zarr_internals, "SUPPORTED", False)
    monkeypatch.setattr(zarr_internals, "write_pieces", lambda *a: calls.append(a))
    dump(prompts, tmp_path / "public.zarr", batch_size=16, progress=False)
    assert calls == []
    fast, public = (zarr_module.open_group(str(tmp_path / n), mode="r") for n in ("fast.zarr", "public.zarr"))
    assert sorted(fast.array_keys()) == sorted(public.array_keys())
    for name in fast.array_keys():
        np.testing.assert_array_equal(fast[name][...], public[name][...], err_msg=name)
