"""A dump of the bundled examples equals the one written before the runner/registry restructure.

`tests/data/dump_reference.npz` holds what `grokscope.dump` wrote at commit bcafed2 (routing and
top-4 attention of layer 1, every head) for `assets/grok-tiny/examples.jsonl`, batch size 8:
each array's values at the real (unpadded) positions, concatenated over sequences. Integers
must match exactly; floats bit for bit on this machine, and within 1e-6 relative on another
CPU, where XLA may vectorise the same program differently.
"""

from pathlib import Path

import numpy as np
import zarr

from grokscope import RecordSpec, dump
from grokscope.session import default_model_dir

REFERENCE = Path(__file__).parent / "data" / "dump_reference.npz"


def _valid_values(group, name, length):
    a = group[name][:]
    if name == "length":
        return a
    if name.startswith("attn"):  # (sequence, attn_layer, head, query, rank)
        return np.concatenate([a[s, :, :, :n].reshape(-1) for s, n in enumerate(length)])
    return np.concatenate([a[s, :n].reshape(-1) for s, n in enumerate(length)])


def test_dump_equals_the_recorded_reference(tmp_path):
    out = tmp_path / "examples.zarr"
    dump(default_model_dir() / "examples.jsonl", out,
         record=RecordSpec.parse("routing,attention:layers=1:heads=all:format=topk:k=4"), batch_size=8,
         progress=False)
    group = zarr.open_group(str(out), mode="r")
    length = group["length"][:]
    reference = np.load(REFERENCE)
    identical = []
    for name in reference.files:
        got, want = _valid_values(group, name, length), reference[name]
        assert got.dtype == want.dtype and got.shape == want.shape, name
        if np.issubdtype(want.dtype, np.integer):
            np.testing.assert_array_equal(got, want, err_msg=name)
        else:
            np.testing.assert_allclose(got.astype(np.float64), want.astype(np.float64), rtol=1e-6, atol=1e-7,
                                       err_msg=name)
        identical.append(f"{name}: {'bit-identical' if np.array_equal(got, want) else 'within 1e-6'}")
    print("; ".join(identical))
