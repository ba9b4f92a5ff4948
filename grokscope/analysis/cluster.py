"""Running the analysis on a dask cluster.

Every function in `grokscope.analysis` works on the lazy, dask-backed Dataset of `open_store`;
with a `dask.distributed` client active, its computations run on that client's cluster, with no
change to the functions. `connect` makes one active:

    from grokscope.analysis.cluster import connect
    client = connect("tcp://scheduler:8786")     # or a Client / LocalCluster you made
    summarize(open_store("s3://bucket/activations/run.zarr"), by="label")

The store must be readable from the workers at the same path or URL (a shared file system or
an object store).
"""

from __future__ import annotations

__all__ = ["connect"]


def connect(scheduler, timeout: float = 30):
    """A `dask.distributed.Client` for `scheduler` (an address such as "tcp://host:8786", a
    cluster object, or a Client), made the default for every dask computation that follows.
    `timeout`: seconds to wait for the scheduler before giving up."""
    from dask.distributed import Client

    if isinstance(scheduler, Client):
        client = scheduler
    else:
        try:
            client = Client(scheduler, timeout=timeout)
        except OSError as e:
            raise ValueError(f"--scheduler {scheduler!r}: cannot reach the dask scheduler within {timeout:g} s ({e})") from None
    client.as_current()
    return client
