"""Bad input to the Python API is refused with one clear error, before the model runs."""

import numpy as np
import pytest

from grokscope import forward


@pytest.fixture(scope="module")
def session(bundled_session):
    return bundled_session


@pytest.mark.parametrize("shape", [(0, 5), (2, 0), (0, 0)])
def test_forward_refuses_empty_batches(tiny_config, tiny_params, shape):
    with pytest.raises(ValueError, match=rf"forward: tokens must hold at least one sequence.*{list(shape)}"):
        forward(tiny_params, tiny_config, np.zeros(shape, np.int32))


def test_forward_refuses_positions_of_another_shape(tiny_config, tiny_params):
    tokens = np.ones((2, 4), np.int32)
    with pytest.raises(ValueError, match=r"positions must be an int array shaped like tokens \[2, 4\].*\[2, 3\]"):
        forward(tiny_params, tiny_config, tokens, positions=np.zeros((2, 3), np.int32))
    with pytest.raises(ValueError, match="positions must be an int array"):
        forward(tiny_params, tiny_config, tokens, positions=np.zeros((2, 4), np.float32))


def test_run_refuses_metadata_of_the_wrong_length(session):
    with pytest.raises(ValueError, match=r"metadata\['label'\]: expected 2 values \(one per prompt\), got 1"):
        session.run(["a b", "c d"], metadata={"label": ["x"]})
    with pytest.raises(ValueError, match=r"metadata\['label'\]: expected one value per prompt \(2\), got str"):
        session.run(["a b", "c d"], metadata={"label": "xy"})


@pytest.mark.parametrize("name", ["", "a/b", ".hidden", "tokens", "expert_index", "zarr.json", "Label2", "generated"])
def test_run_refuses_metadata_names_the_store_cannot_hold(session, name):
    metadata = {"label2": ["y"], name: ["x"]} if name == "Label2" else {name: ["x"]}  # case-only clash
    with pytest.raises(ValueError, match="metadata name"):
        session.run(["a b"], metadata=metadata)


def test_run_refuses_values_the_store_cannot_hold_exactly(session):
    with pytest.raises(ValueError, match="cannot be stored exactly in this field's float64 column"):
        session.run(["a b", "c d"], metadata={"n": [2**53 + 1, 0.5]})
    with pytest.raises(ValueError, match="is not a finite number"):
        session.run(["a b"], metadata={"n": [float("nan")]})


def test_run_keeps_metadata_of_the_right_length(session):
    ds = session.run(["a b", "c d"], metadata={"label": ["x", "y"], "n": [1, 2]})
    assert [str(v) for v in ds["label"].values] == ["x", "y"]
    assert list(ds["n"].values) == [1, 2]


@pytest.mark.parametrize("temperature", [float("nan"), float("inf"), -1.0])
def test_generate_refuses_a_temperature_that_is_not_a_finite_non_negative_number(session, temperature):
    with pytest.raises(ValueError, match="temperature must be >= 0"):
        session.generate("a b", max_new_tokens=2, temperature=temperature)


def test_generate_refuses_a_nan_top_p(session):
    with pytest.raises(ValueError, match="0 < top_p <= 1"):
        session.generate("a b", max_new_tokens=2, top_p=float("nan"))
