"""Checkpoint formats: one reader per format, and `load_params` that picks by the directory.

  grok1    `ckpt-0/tensor{i:05d}_000` pickles of the Grok-1 release (`grokscope.checkpoint`,
           a safe unpickler); int8 `QuantizedWeight8bit` matmul weights.
  grok2    safetensors in the Grok-2 release's TP=8 layout or unsharded (`grokscope.formats.grok2`);
           bfloat16, optionally quantized to int8 as they are loaded.

Both stream tensor by tensor onto the mesh, validate every tensor against the config's
parameter layout (`grokscope.layout`), and can hash the bytes they read for content digests.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

__all__ = ["FORMATS", "detect_format", "load_params", "checkpoint_identity"]

FORMATS = ("grok1", "grok2")


def detect_format(directory: str | os.PathLike) -> str | None:
    """"grok1" (a `ckpt-0/` directory), "grok2" (Grok-2 safetensors) or None."""
    from grokscope.formats.grok2 import is_grok2_dir

    directory = Path(directory)
    if (directory / "ckpt-0").is_dir():
        return "grok1"
    if is_grok2_dir(directory):
        return "grok2"
    return None


def load_params(directory: str | os.PathLike, config, mesh=None, quantize: str | None = None,
                digests: dict | None = None, **options) -> dict:
    """Loads the checkpoint in `directory`, whichever format it is in (see the module).

    `quantize="int8"` quantizes a bfloat16 checkpoint's matmul weights as they load (a Grok-1
    checkpoint is int8 already). `digests`, if a dict, receives `{param path: hex digest}`.
    Other keyword options go to the format's reader.
    """
    fmt = detect_format(directory)
    if fmt == "grok1":
        from grokscope.checkpoint import load_params as load_grok1

        if quantize not in (None, "int8"):
            raise ValueError(f"quantize: expected None or 'int8', got {quantize!r}")
        return load_grok1(directory, config, mesh=mesh, digests=digests, **options)
    if fmt == "grok2":
        from grokscope.formats.grok2 import load_params as load_grok2

        return load_grok2(directory, config, mesh=mesh, quantize=quantize, digests=digests, **options)
    raise _no_checkpoint(directory)


def checkpoint_identity(directory: str | os.PathLike) -> dict[str, Any]:
    """Path and a hash of the checkpoint's file index (names and sizes): cheap, reads no tensor."""
    fmt = detect_format(directory)
    if fmt == "grok1":
        from grokscope.checkpoint import checkpoint_identity as grok1_identity

        return grok1_identity(directory)
    if fmt == "grok2":
        from grokscope.formats.grok2 import checkpoint_files

        entries = sorted((p.name, p.stat().st_size) for p in checkpoint_files(directory))
        return {"path": str(Path(directory).resolve()), "num_files": len(entries),
                "total_bytes": sum(size for _, size in entries),
                "index_sha256": hashlib.sha256(repr(entries).encode()).hexdigest(), "format": "grok2"}
    raise _no_checkpoint(directory)


def _no_checkpoint(directory):
    from grokscope.checkpoint import CheckpointError

    return CheckpointError(f"{directory}: no checkpoint: no ckpt-0/ directory (Grok-1's tensor files) and no Grok-2 "
                           f"safetensors (pytorch_model-*-TP-*.safetensors or model*.safetensors)")
