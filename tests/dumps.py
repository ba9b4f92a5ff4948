"""Helpers the dump tests share: labelled prompt files, and reading or comparing stores."""

import json

import numpy as np
import zarr

WORDS = "the of and to in is was for on that with as by at from his an were are which this be".split()


def prompts_file(path, n, seed=0, max_words=20):
    """A .jsonl of `n` random word prompts (3 .. max_words - 1 words), labels a/b and index `i`."""
    rng = np.random.default_rng(seed)
    lines = [json.dumps({"text": " ".join(rng.choice(WORDS, size=int(rng.integers(3, max_words)))),
                         "label": ["a", "b"][i % 2], "i": i}) for i in range(n)]
    path.write_text("\n".join(lines) + "\n")
    return path


def store_arrays(path):
    """Every array's values and the root attributes of the store at `path`."""
    group = zarr.open_group(str(path), mode="r")
    return {name: group[name][...] for name in group.array_keys()}, dict(group.attrs)


def assert_same_arrays(a, b):
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].dtype == b[name].dtype, name
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)
