"""One dump over two processes (4 simulated CPU devices each, gloo collectives, a (2, 4) mesh
spanning both), on JAX's multi-controller runtime: the store equals the single-process one."""

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import zarr

from grokscope import dump, make_mesh
from grokscope.session import default_model_dir

pytestmark = pytest.mark.slow  # minutes: `pytest -m 'not slow'` leaves them out while iterating

EXAMPLES = default_model_dir() / "examples.jsonl"
PROMPTS_KEPT = 24  # six batches of 4: enough for a kill to land mid-run, and half the run time of all 48


@pytest.fixture(scope="module")
def prompts(tmp_path_factory) -> Path:
    """The first 24 of the bundled examples (code and prose), as a prompts file."""
    path = tmp_path_factory.mktemp("prompts") / "prompts.jsonl"
    path.write_text("".join(EXAMPLES.read_text().splitlines(keepends=True)[:PROMPTS_KEPT]))
    return path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(out: Path, port: int, process_id: int, batch_size: int, log: Path, extra=(),
           prompts: Path = EXAMPLES) -> subprocess.Popen:
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4", "JAX_PLATFORMS": "cpu"}
    command = [sys.executable, "-m", "grokscope.cli", "dump", "--prompts", str(prompts), "--out", str(out),
               "--batch-size", str(batch_size), "--mesh", "2x4", "--quiet", "--coordinator", f"127.0.0.1:{port}",
               "--num-processes", "2", "--process-id", str(process_id), "--coordinator-timeout", "60", *extra]
    with open(log, "w") as handle:  # the child keeps its own copy of the descriptor
        return subprocess.Popen(command, env=env, stdout=handle, stderr=subprocess.STDOUT, start_new_session=True)


def _run_job(out: Path, batch_size: int, logs: Path, prompts: Path) -> None:
    port = _free_port()
    procs = [_start(out, port, i, batch_size, logs / f"process{i}.log", prompts=prompts) for i in range(2)]
    for i, p in enumerate(procs):
        assert p.wait(timeout=300) == 0, (logs / f"process{i}.log").read_text()[-3000:]


def _assert_same_store(a: Path, b: Path) -> None:
    """Array by array: tokens, texts, flags and expert choices exactly; float records to 1e-5
    (the processes' collectives sum in another order than one process's)."""
    ga, gb = zarr.open_group(str(a), mode="r"), zarr.open_group(str(b), mode="r")
    assert sorted(ga.array_keys()) == sorted(gb.array_keys())
    for name in ga.array_keys():
        x, y = ga[name][...], gb[name][...]
        if x.dtype.kind == "f":
            np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-5, err_msg=name)
        else:
            np.testing.assert_array_equal(x, y, err_msg=name)
    assert ga.attrs["status"] == gb.attrs["status"] == "complete"


@pytest.fixture(scope="module")
def single(tmp_path_factory, prompts):
    """The same prompts, one process over 8 devices with the same (2, 4) mesh."""
    out = tmp_path_factory.mktemp("single") / "s.zarr"
    dump(prompts, out, batch_size=4, mesh=make_mesh(2, 4), progress=False)
    return out


def test_two_processes_write_the_single_process_store(tmp_path, single, prompts):
    out = tmp_path / "multi.zarr"
    _run_job(out, 4, tmp_path, prompts)
    _assert_same_store(out, single)
    # each process wrote only its own rows: chunks along `sequence` are half a batch
    assert zarr.open_group(str(out), mode="r")["done"].chunks == (2,)


def test_a_killed_process_resumes_to_the_identical_store(tmp_path, single, prompts):
    out = tmp_path / "killed.zarr"
    port = _free_port()
    procs = [_start(out, port, i, 4, tmp_path / f"first{i}.log", prompts=prompts) for i in range(2)]
    deadline = time.monotonic() + 240
    while True:  # until some, not all, sequences are written
        assert time.monotonic() < deadline, (tmp_path / "first0.log").read_text()[-3000:]
        if (out / "zarr.json").exists():
            done = zarr.open_group(str(out), mode="r")["done"][...]
            if 0 < done.sum() < done.size:
                break
            if done.all():
                pytest.fail("the job finished before it could be killed; use more prompts")
        time.sleep(0.05)
    os.killpg(procs[1].pid, signal.SIGKILL)  # process 1 dies mid-run
    procs[1].wait()
    os.killpg(procs[0].pid, signal.SIGKILL)  # process 0 is left waiting on it: the job is gone
    procs[0].wait()
    assert zarr.open_group(str(out), mode="r").attrs["status"] == "in_progress"
    _run_job(out, 4, tmp_path, prompts)  # the same command again, both processes
    _assert_same_store(out, single)


def test_bad_coordination_input_is_named(tmp_path):
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4", "JAX_PLATFORMS": "cpu"}
    base = [sys.executable, "-m", "grokscope.cli", "dump", "--prompts", str(EXAMPLES), "--out", str(tmp_path / "x.zarr")]
    r = subprocess.run(base + ["--coordinator", "127.0.0.1:1"], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and "go together" in r.stderr
    r = subprocess.run(base + ["--coordinator", "127.0.0.1:1", "--num-processes", "2", "--process-id", "2"], env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and "--process-id 2 must lie in [0, --num-processes 2)" in r.stderr
    # nobody at the coordinator's address: a clear error after the timeout, and no store
    r = subprocess.run(base + ["--coordinator", f"127.0.0.1:{_free_port()}", "--num-processes", "2",
                               "--process-id", "1", "--coordinator-timeout", "5"], env=env, capture_output=True,
                       text=True, timeout=180)
    assert r.returncode == 1 and "cannot join the job" in r.stderr, r.stderr[-2000:]
    assert not (tmp_path / "x.zarr").exists()


def test_mismatched_process_counts_are_named_and_leave_no_finished_store(tmp_path, prompts):
    out = tmp_path / "mismatch.zarr"
    port = _free_port()
    leader = _start(out, port, 0, 4, tmp_path / "m0.log", prompts=prompts)
    follower = _start(out, port, 1, 4, tmp_path / "m1.log", extra=["--num-processes", "3"],
                      prompts=prompts)  # the last one wins
    # The follower names the problem and returns 1; its interpreter then waits about 30 s in JAX's
    # distributed shutdown for the partner it will never have, so the test stops at the message.
    log_file, deadline = tmp_path / "m1.log", time.monotonic() + 180
    while "given --num-processes" not in log_file.read_text() and follower.poll() is None:
        assert time.monotonic() < deadline, log_file.read_text()[-3000:]
        time.sleep(0.1)
    time.sleep(0.5)  # the rest of the line
    log = log_file.read_text()
    assert "error: this process was given --num-processes 3, but the job process 0 started" in log
    assert "has 2 processes" in log
    for process in (follower, leader):  # the leader is left waiting for its partner
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    assert follower.returncode in (1, -signal.SIGKILL)
    # nothing is published as finished; a killed job's store resumes to the identical store
    # (test_a_killed_process_resumes_to_the_identical_store)
    assert not out.exists() or zarr.open_group(str(out), mode="r").attrs["status"] == "in_progress"
