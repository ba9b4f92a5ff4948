"""One job over several processes or hosts, on JAX's multi-controller runtime.

Every process runs the same program (`grokscope dump ... --coordinator HOST:PORT
--num-processes N --process-id I`); `jax.distributed.initialize` connects them, the mesh spans
all their devices, and each process writes only the store chunks whose rows its own devices
hold (replica 0 of each row block). The store is created by process 0 while the others wait at
a barrier, and marked complete by process 0 after a barrier that every process reaches only
when its writes are done. No other coordination exists.
"""

from __future__ import annotations

import os
from typing import Sequence

import numpy as np

__all__ = ["DistributedError", "initialize", "barrier", "owned_rows", "rows_per_writer"]


class DistributedError(RuntimeError):
    """The processes of a job could not be connected as asked."""


def initialize(coordinator: str | None = None, num_processes: int | None = None, process_id: int | None = None,
               timeout_s: int = 120) -> None:
    """Connects this process to the job: with all three arguments, explicitly; with none, from
    the environment the way `jax.distributed.initialize` reads it (SLURM, Open MPI, ...).

    Must run before anything else uses JAX. On CPU the processes talk through gloo.
    """
    import jax

    given = [coordinator is not None, num_processes is not None, process_id is not None]
    if any(given) and not all(given):
        raise DistributedError("--coordinator, --num-processes and --process-id go together (or give none of them "
                               "and let JAX read the cluster's environment, e.g. under SLURM)")
    if all(given):
        if num_processes < 1 or not 0 <= process_id < num_processes:
            raise DistributedError(f"--process-id {process_id} must lie in [0, --num-processes {num_processes})")
        host, sep, port = coordinator.rpartition(":")
        if not sep or not host or not port.isdigit():
            raise DistributedError(f"--coordinator {coordinator!r}: expected HOST:PORT")
        if process_id > 0:
            _wait_for(host, int(port), timeout_s, process_id, num_processes)
    platforms = os.environ.get("JAX_PLATFORMS", "")
    if platforms == "" or platforms.startswith("cpu"):
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    try:
        jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes,
                                   process_id=process_id, initialization_timeout=timeout_s)
    except Exception as e:  # noqa: BLE001 - JAX raises several types; all mean the same here
        where = f"coordinator {coordinator}" if coordinator else "the coordinator named by the environment"
        raise DistributedError(f"cannot join the job through {where} as process {process_id} of {num_processes} "
                               f"within {timeout_s} s ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
                               f"is process 0 running, and do all processes give the same --num-processes?") from None
    if num_processes is not None and jax.process_count() != num_processes:
        raise DistributedError(f"this process was given --num-processes {num_processes}, but the job process 0 "
                               f"started at {coordinator} has {jax.process_count()} processes; give every process "
                               f"the same --num-processes")


def _wait_for(host: str, port: int, timeout_s: float, process_id: int, num_processes: int) -> None:
    """Waits until process 0's coordinator accepts connections (JAX's own client aborts the
    whole process when it cannot connect, so a missing coordinator is caught here first)."""
    import socket
    import time

    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with socket.create_connection((host, port), timeout=2):
                return
        except OSError as e:
            if time.monotonic() > deadline:
                raise DistributedError(
                    f"cannot join the job as process {process_id} of {num_processes}: nothing answers at the "
                    f"coordinator {host}:{port} after {timeout_s} s ({e.strerror or e}); start process 0 there "
                    f"(it runs the coordinator), or fix --coordinator") from None
            time.sleep(0.5)


def barrier(name: str) -> None:
    """Waits until every process of the job reaches the barrier `name` (no-op for one process)."""
    import jax

    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def _row_blocks(sharding, shape: Sequence[int]) -> list[tuple[tuple[int, int], int]]:
    """((start, stop), process) of every device's row block, in the sharding's device order
    (the first device holding a block holds its replica 0)."""
    out = []
    for device, index in sharding.devices_indices_map(tuple(shape)).items():
        start, stop, _ = (index[0] if index else slice(None)).indices(shape[0])
        out.append(((start, stop), device.process_index))
    return out


def owned_rows(sharding, shape: Sequence[int]) -> list[tuple[int, int]]:
    """The [start, stop) row ranges of an array of `shape` under `sharding` that this process
    writes: those whose replica 0 is on one of this process's devices."""
    import jax

    owner: dict[tuple[int, int], int] = {}
    for rows, process in _row_blocks(sharding, shape):
        owner.setdefault(rows, process)
    return sorted(rows for rows, process in owner.items() if process == jax.process_index())


def rows_per_writer(sharding, shape: Sequence[int]) -> int:
    """The row count that divides every block a process owns: the store's chunk along
    `sequence` must divide it, so that no two processes ever share a chunk."""
    return int(np.gcd.reduce([stop - start for (start, stop), _ in _row_blocks(sharding, shape)]))
