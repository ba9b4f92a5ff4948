"""The analysis on a dask.distributed cluster: unchanged functions, the same numbers."""

import numpy as np
import pytest
import xarray as xr

from grokscope import dump, open_store
from grokscope.analysis import coactivation, hard_load
from grokscope.analysis.cluster import connect
from grokscope.analysis.summary import summarize
from grokscope.cli import main
from grokscope.session import default_model_dir

pytestmark = pytest.mark.slow  # minutes: `pytest -m 'not slow'` leaves them out while iterating


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    out = tmp_path_factory.mktemp("cluster") / "s.zarr"
    dump(default_model_dir() / "examples.jsonl", out, batch_size=8, progress=False)
    return out


def test_analysis_runs_unchanged_on_a_local_cluster(store, capsys):
    from dask.distributed import Client, LocalCluster, get_task_stream

    local = summarize(open_store(str(store)), by="label", n_permutations=20)
    local_load = hard_load(open_store(str(store))).compute()
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster:
        with Client(cluster) as client:
            from grokscope.analysis.cluster import connect

            assert connect(client) is client
            ds = open_store(str(store))
            load = hard_load(ds)
            assert load.chunks is not None  # lazy: computed by the workers
            np.testing.assert_allclose(load.compute().values, local_load.values)
            with get_task_stream(client) as tasks:
                remote = summarize(ds, by="label", n_permutations=20)
            xr.testing.assert_allclose(remote, local)
            assert len(tasks.data) > 0  # the summary's chunks were computed by the cluster's workers
            co = coactivation(ds).compute()
            assert np.isfinite(co["coactivation"].values).any()
            address = cluster.scheduler_address
            assert main(["analyze", str(store), "--by", "label", "--permutations", "20", "--scheduler", address]) == 0
    out = capsys.readouterr().out
    assert "layer" in out and "most enriched expert" in out


def test_unreachable_scheduler_is_named(store, capsys):
    assert main(["analyze", str(store), "--scheduler", "tcp://127.0.0.1:1", "--scheduler-timeout", "2"]) == 1
    assert "cannot reach the dask scheduler within 2 s" in capsys.readouterr().err


