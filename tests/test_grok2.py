"""Grok-2: config, the release's safetensors layout, and parity with ../shared/fixtures/grok2-tiny.

The fixture holds a tiny random Grok-2 in the release's exact file layout, outputs of
sglang-jax's own Grok model (bf16, on CPU) and a float64 reference written from SGLang's
code (`ref64_*`); its README gives the tolerances used here.
"""

import dataclasses
import json
import shutil

import jax
import ml_dtypes
import numpy as np
import pytest

import grokscope as gs
from grokscope.config import GROK_2, ConfigError, ModelConfig, load_config
from grokscope.formats import checkpoint_identity, detect_format, load_params
from grokscope.formats.grok2 import Grok2CheckpointError, release_names, save_release
from grokscope.formats.safetensors_io import read_header, read_tensor
from grokscope.interventions import zero_dense
from grokscope.quant import QuantizedWeight8bit, dequantize
from grokscope.record import RecordSpec
from grokscope.sharding import make_mesh


@pytest.fixture(scope="module")
def g2(grok2_fixture_dir):
    config = load_config(str(grok2_fixture_dir / "config.json"))
    params = load_params(grok2_fixture_dir, config)
    ref = np.load(grok2_fixture_dir / "reference.npz")
    lengths = ref["lengths"]
    starts = np.cumsum(lengths) - lengths
    tokens = np.zeros((len(lengths), int(lengths.max())), np.int32)
    for i, (s, n) in enumerate(zip(starts, lengths)):
        tokens[i, :n] = ref["input_ids"][s:s + n]
    return config, params, ref, tokens


def _flat(x, lengths):
    """[S, T, ...] padded -> the fixture's [N, ...] (sequences concatenated, pads dropped)."""
    x = np.asarray(x)
    return np.concatenate([x[i, :n] for i, n in enumerate(lengths)])


def _by_token(ref_array):
    """The fixture's [L, N, ...] -> [N, L, ...] as grokscope records layers."""
    return np.swapaxes(ref_array, 0, 1)


# --- config -----------------------------------------------------------------------------------

def test_release_config_reads_as_grok2(grok2_fixture_dir):
    raw = json.loads((grok2_fixture_dir / "config.json").read_text())
    config = load_config(str(grok2_fixture_dir / "config.json"))
    assert (config.emb_size, config.num_layers, config.num_q_heads, config.num_kv_heads, config.key_size) == \
        (raw["hidden_size"], raw["num_hidden_layers"], raw["num_attention_heads"], raw["num_key_value_heads"],
         raw["head_dim"])
    assert (config.ffn_size, config.dense_ffn_size) == (raw["moe_intermediate_size"], raw["intermediate_size"])
    assert config.attn_output_multiplier == pytest.approx(raw["head_dim"] ** -0.5)
    assert (config.attn_logit_softcap, config.router_logit_softcap, config.final_logit_softcap) == (30, 30, 50)
    assert config.attn_temperature_len == raw["attn_temperature_len"] == 4
    assert config.rope_theta == 208533496 and not config.tied_embeddings and config.multipliers_dtype == "float32"


def test_grok2_preset_matches_the_release_figures():
    # Sizes from research/grok2-facts.md: 269,515,497,472 parameters.
    from grokscope.layout import param_layout

    total = sum(int(np.prod(spec.shape)) for spec in param_layout(GROK_2).values())
    assert total == 269_515_497_472
    assert all(spec.dtype == np.dtype(ml_dtypes.bfloat16) for spec in param_layout(GROK_2).values())


@pytest.mark.parametrize("change, message", [
    ({"architectures": ["LlamaForCausalLM"]}, "architectures: expected ['Grok1ForCausalLM']"),
    ({"rope_type": "yarn"}, "rope_type: expected 'original', got 'yarn'"),
    ({"sliding_window_size": 4096}, "sliding_window_size"),
    ({"mystery_knob": 1}, "unknown keys ['mystery_knob']"),
    ({"num_local_experts": None}, "missing keys ['num_local_experts']"),
])
def test_hf_config_refuses_what_it_cannot_honor(grok2_fixture_dir, tmp_path, change, message):
    raw = json.loads((grok2_fixture_dir / "config.json").read_text())
    for key, value in change.items():
        if value is None:
            del raw[key]
        else:
            raw[key] = value
    path = tmp_path / "config.json"
    path.write_text(json.dumps(raw))
    with pytest.raises(ConfigError, match=f"^{path}: .*") as info:
        load_config(str(path))
    assert message in str(info.value) and "\n" not in str(info.value)


def test_grok1_config_gains_no_grok2_behaviour():
    config = load_config("grok-1")
    assert not config.has_dense_mlp and config.tied_embeddings and config.weight_format == "int8"
    assert ModelConfig.from_dict(config.to_dict()) == config


# --- parity -----------------------------------------------------------------------------------

def _parity(out, ref, lengths):
    logits = _flat(out.logits, lengths)
    index = _flat(out.record["expert_index"], lengths)
    same = (np.sort(index, -1) == np.sort(_by_token(ref["ref64_topk_ids"]), -1)).all(-1)
    return logits, index, same


@pytest.mark.parametrize("mesh_shape", [None, (1, 4)])
def test_float32_matches_the_float64_reference(g2, mesh_shape):
    config, params, ref, tokens = g2
    lengths = ref["lengths"]
    mesh = None if mesh_shape is None else make_mesh(*mesh_shape)
    out = gs.forward(params, config, tokens, record=RecordSpec(routing=True, expert_outputs="all"), mesh=mesh)
    logits, index, same = _parity(out, ref, lengths)
    assert same.mean() >= 0.99
    # positions no routing flip reaches: a sequence's positions from its first flipped token on are excluded
    starts = np.cumsum(lengths) - lengths
    reached = np.zeros(len(logits), bool)
    for s, n in zip(starts, lengths):
        flips = np.flatnonzero(~same[s:s + n].all(-1))
        if flips.size:
            reached[s + flips[0]:s + n] = True
    delta = np.abs(logits - ref["ref64_logits"])[~reached]
    assert delta.mean() <= 0.002 and delta.max() <= 0.05
    # router logits as the softmax sees them: the reference stores them before the 30-cap
    capped = 30 * np.tanh(_by_token(ref["ref64_router_logits"]) / 30)
    assert np.abs(_flat(out.record["router_logits"], lengths) - capped).max() <= 0.01
    gates = _flat(out.record["expert_gate"], lengths)
    assert np.abs(gates - _by_token(ref["ref64_topk_gates"]))[same].max() <= 0.002
    for name, key in (("mlp_output", "ref64_layer_mlp_out"), ("moe_output", "ref64_layer_moe_out"),
                      ("moe_input", "ref64_layer_mlp_in")):
        assert np.abs(_flat(out.record[name], lengths) - _by_token(ref[key])).max() <= 0.002, name


def test_bfloat16_matches_the_sglang_jax_oracle(g2, grok2_fixture_dir):
    config, params, ref, tokens = g2
    lengths = ref["lengths"]
    agreement = json.loads((grok2_fixture_dir / "agreement.json").read_text())
    out = gs.forward(params, config, tokens, record=RecordSpec(routing=True), compute_dtype="bfloat16")
    index = _flat(out.record["expert_index"], lengths)
    assert (np.sort(index, -1) == np.sort(_by_token(ref["topk_ids"]), -1)).all(-1).mean() >= 0.95
    # bf16 tolerance: as far from the oracle as the oracle is from the float64 reference
    oracle_noise = agreement["oracle_vs_ref64tanh.logits"]
    delta = np.abs(_flat(out.logits, lengths) - ref["logits"])
    assert delta.mean() <= 2 * oracle_noise["mean_abs"] and delta.max() <= 2 * oracle_noise["max_abs"]


def test_erf_gelu_matches_the_erf_reference(g2):
    config, params, ref, tokens = g2
    out = gs.forward(params, dataclasses.replace(config, gelu="erf"), tokens)
    delta = np.abs(_flat(out.logits, ref["lengths"]) - ref["ref64_erf_logits"])
    assert delta.mean() <= 0.002 and delta.max() <= 0.05
    # and the two variants are told apart at float32
    tanh = gs.forward(params, config, tokens)
    assert np.abs(_flat(tanh.logits, ref["lengths"]) - ref["ref64_erf_logits"]).max() > 10 * delta.max()


def test_zero_dense_equals_a_model_without_dense_mlp(g2):
    config, params, ref, tokens = g2
    zeroed = {m: ({n: np.zeros_like(v) for n, v in values.items()} if "/mlp/linear_1" in m else values)
              for m, values in params.items()}
    spec = RecordSpec(routing=True, expert_outputs="all")
    intervened = gs.forward(params, config, tokens, record=spec, interventions=(zero_dense(),))
    without = gs.forward(zeroed, config, tokens, record=spec)
    np.testing.assert_array_equal(np.asarray(intervened.logits), np.asarray(without.logits))
    assert not np.asarray(intervened.record["mlp_output"]).any()
    with pytest.raises(ValueError, match="no dense MLP"):
        gs.forward(gs.init_params(load_config("tiny")), load_config("tiny"), tokens, interventions=(zero_dense(),))


# --- the release's files ----------------------------------------------------------------------

def test_reader_agrees_with_the_safetensors_package(grok2_fixture_dir):
    from safetensors import safe_open

    for file in sorted(grok2_fixture_dir.glob("*.safetensors"))[::7]:
        header = read_header(file)
        with safe_open(str(file), "flax") as f:
            assert sorted(f.keys()) == sorted(header)
            for name in f.keys():
                expected = np.asarray(f.get_tensor(name))
                got = read_tensor(header[name])
                assert got.dtype == expected.dtype and got.shape == expected.shape
                np.testing.assert_array_equal(got.view(np.uint16), expected.view(np.uint16))


def test_experts_are_stitched_from_their_rank_slices(g2, grok2_fixture_dir):
    config, params, _, _ = g2
    from safetensors import safe_open

    def piece(number, rank, name):
        with safe_open(str(grok2_fixture_dir / f"pytorch_model-{number:05d}-TP-{rank:03d}.safetensors"), "flax") as f:
            return np.asarray(f.get_tensor(name)).astype(np.float32)

    name = "model.layers.1.block_sparse_moe.experts.5.{}.weight"
    w1 = np.concatenate([piece(6, r, name.format("w1")) for r in range(8)], axis=0)  # [F, D]
    w2 = np.concatenate([piece(7, r, name.format("w2")) for r in range(8)], axis=1)  # [D, F]
    layer = params["transformer/decoder_layer_1/moe/linear"]["w"]
    np.testing.assert_array_equal(np.asarray(layer[5], np.float32), w1.T)
    np.testing.assert_array_equal(np.asarray(params["transformer/decoder_layer_1/moe/linear_1"]["w"][5],
                                             np.float32), w2.T)


def test_written_release_reads_back_and_is_valid_safetensors(g2, tmp_path):
    config, params, _, _ = g2
    from safetensors import safe_open

    save_release(params, config, tmp_path)
    assert len(list(tmp_path.glob("*.safetensors"))) == 39
    with safe_open(str(tmp_path / "pytorch_model-00008-TP-007.safetensors"), "flax") as f:
        assert len(list(f.keys())) == config.num_layers * config.num_experts
    digests, again = {}, {}
    reloaded = load_params(tmp_path, config, digests=digests)
    load_params(tmp_path, config, digests=again)
    for module, values in params.items():
        for name, value in values.items():
            np.testing.assert_array_equal(np.asarray(reloaded[module][name]).view(np.uint16),
                                          np.asarray(value).view(np.uint16))
    assert digests == again and len(digests) == len(jax.tree.leaves(params))
    assert detect_format(tmp_path) == "grok2" and checkpoint_identity(tmp_path)["num_files"] == 39


@pytest.mark.parametrize("damage, message", [
    ("drop_rank", "rank 3 missing"),
    ("truncate", "pytorch_model-00010-TP-common.safetensors: "),
    ("extra_layer", "unexpected tensor 'model.layers.2."),
    ("drop_file", "tensor 'model.layers.0.pre_moe_norm.weight' missing (expected in "
                  "pytorch_model-00015-TP-common.safetensors)"),
])
def test_damaged_release_is_refused_by_name(grok2_fixture_dir, tmp_path, damage, message):
    directory = tmp_path / "ckpt"
    shutil.copytree(grok2_fixture_dir, directory)
    config = load_config(str(directory / "config.json"))
    if damage == "drop_rank":
        (directory / "pytorch_model-00007-TP-003.safetensors").unlink()
    elif damage == "truncate":
        file = directory / "pytorch_model-00010-TP-common.safetensors"
        file.write_bytes(file.read_bytes()[:-100])
    elif damage == "extra_layer":
        config = dataclasses.replace(config, num_layers=1)
        message = "unexpected tensor 'model.layers.1."
    elif damage == "drop_file":
        (directory / "pytorch_model-00015-TP-common.safetensors").unlink()
    with pytest.raises(Grok2CheckpointError) as info:
        load_params(directory, config)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_int8_on_load_quantizes_the_matmul_weights(g2, grok2_fixture_dir):
    config, params, ref, tokens = g2
    quantized = load_params(grok2_fixture_dir, config, quantize="int8")
    w = quantized["transformer/decoder_layer_0/moe/linear_1"]["w"]
    assert isinstance(w, QuantizedWeight8bit) and w.weight.dtype == np.int8 and w.n_blocks == 8
    assert not isinstance(quantized["transformer/decoder_layer_0/router"]["w"], QuantizedWeight8bit)
    # within half a quantization step of the bf16 weight, column by column
    original = np.asarray(params["transformer/decoder_layer_0/moe/linear_1"]["w"], np.float32)
    restored = np.asarray(dequantize(w, np.float32))
    step = np.repeat(np.asarray(w.scales, np.float32), original.shape[1] // 8, axis=1)
    assert (np.abs(restored - original) <= 0.5 * step + 1e-6).all()
    out = gs.forward(quantized, config, tokens, record=RecordSpec(routing=True))
    index = _flat(out.record["expert_index"], ref["lengths"])
    assert (np.sort(index, -1) == np.sort(_by_token(ref["ref64_topk_ids"]), -1)).all(-1).mean() >= 0.9


def test_release_names_cover_every_parameter_once():
    config = load_config("grok2-tiny")
    from grokscope.layout import param_layout

    names = release_names(config)
    covered = {}
    for source in names.values():
        covered.setdefault(source.param, set()).add(source.expert)
    assert set(covered) == set(param_layout(config))
    assert covered["transformer/decoder_layer_0/moe/linear/w"] == set(range(8))


def test_routing_interventions_apply_to_grok2(g2):
    config, params, ref, tokens = g2
    from grokscope.interventions import force

    spec = RecordSpec(routing=True)
    banned = gs.forward(params, config, tokens, record=spec, interventions=(gs.interventions.ban(3),))
    assert not (np.asarray(banned.record["expert_index"]) == 3).any()
    forced = gs.forward(params, config, tokens, record=spec, interventions=(force([5, 1], layer=1),))
    np.testing.assert_array_equal(np.asarray(forced.record["expert_index"])[:, :, 1], np.broadcast_to([5, 1], (5, 17, 2)))


# --- the bundled grok2-tiny -------------------------------------------------------------------

def test_bundled_grok2_tiny_runs_and_dumps(tmp_path):
    from grokscope.cli import main as cli
    from grokscope.session import bundled_model_dir

    directory = bundled_model_dir("grok2-tiny")
    assert detect_format(directory) == "grok2"
    session = gs.Session(model="grok2-tiny")
    assert session.config == load_config(str(directory / "config.json")) and session.config.has_dense_mlp
    ds = session.run(["def add(a, b):\n    return a + b"], record=RecordSpec(routing=True, expert_outputs=(0,)))
    assert ds.sizes["layer"] == 4 and "mlp_output" in ds
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("The cat sat on the mat.\nimport os\n")
    assert cli(["dump", "--prompts", str(prompts), "--out", str(tmp_path / "out.zarr"), "--model", "grok2-tiny",
                "--quiet"]) == 0
    stored = gs.open_store(str(tmp_path / "out.zarr"))
    assert stored.attrs["tokenizer"]["format"] == "tiktoken-json"
    np.testing.assert_array_equal(stored["tokens"].values[0, :int(stored["length"][0])],
                                  session.tokenizer.encode("The cat sat on the mat."))


def test_dense_zeroing_and_bans_run_as_data_in_one_program(g2, monkeypatch):
    from grokscope import runner
    from grokscope.interventions import ban

    config, params, ref, tokens = g2
    model = runner.Model(config, params)
    ids = [list(row[row > 0]) for row in tokens]
    base = runner.baseline(model, ids, 5)
    sets = [[zero_dense(layer=0)], [zero_dense(), ban(2, layer=1)], [ban(6)]]
    as_data = [runner.compare(model, base, s) for s in sets]
    assert runner._compare_program(config, base.compute_dtype, ())._cache_size() == 1
    monkeypatch.setattr(runner, "_as_layer_masks", lambda interventions, config: None)  # compiled in instead
    for s, got in zip(sets, as_data):
        want = runner.compare(model, base, s)
        for name in want:
            np.testing.assert_allclose(got[name], want[name], rtol=0, atol=1e-6, err_msg=f"{s}: {name}")
    assert np.nanmax(np.abs(as_data[0]["delta_loss"])) > 0.01  # zeroing the dense MLP does change the outputs


def test_unsharded_hugging_face_layout_loads_the_same(g2, tmp_path):
    """model-0000N-of-0000M.safetensors with whole tensors (experts unsplit), as a Hugging Face
    export would hold them."""
    from grokscope.formats.safetensors_io import write_file

    config, params, _, tokens = g2
    flat = {f"{m}/{n}": np.asarray(v) for m, values in params.items() for n, v in values.items()}
    tensors = {}
    for name, source in release_names(config).items():
        value = flat[source.param] if source.expert is None else flat[source.param][source.expert]
        tensors[name] = np.ascontiguousarray(value.T if source.transpose else value)
    names = sorted(tensors)
    half = len(names) // 2
    write_file(tmp_path / "model-00001-of-00002.safetensors", {n: tensors[n] for n in names[:half]})
    write_file(tmp_path / "model-00002-of-00002.safetensors", {n: tensors[n] for n in names[half:]})
    assert detect_format(tmp_path) == "grok2"
    loaded = load_params(tmp_path, config)
    for module, values in params.items():
        for name, value in values.items():
            np.testing.assert_array_equal(np.asarray(loaded[module][name]).view(np.uint16),
                                          np.asarray(value).view(np.uint16))
