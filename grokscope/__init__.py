"""grokscope: an interpretability workbench for the open Grok models' mixture-of-experts routing.

The public API:
  ModelConfig, GROK_1, GROK_2  model hyper-parameters and the releases' values; load_config(file)
                            reads Grok-1's official config or Grok-2's Hugging Face config.json
  RecordSpec                what the forward records besides logits
  param_shapes(config)      {path: (shape, dtype)} of every checkpoint tensor, in checkpoint order
  make_mesh(data, model)    a ("data", "model") device mesh
  load_params(dir, config)  a release's checkpoint (Grok-1's ckpt-0/, Grok-2's safetensors), validated,
                            placed on a mesh
  forward(params, config, tokens, record, mesh)  -> .logits, .record
  Session                   a loaded model; session.run(text) -> xarray.Dataset
  dump(prompts, out, ...)   prompts -> zarr store (resumable); open_store(path_or_url) -> xarray.Dataset
  verify_store(path_or_url, deep=False)  the problems of a damaged store, each naming its array and chunk
  interventions             ban / zero / force / swap / renormalize / ablate_head / zero_dense, for
                            forward(..., interventions=)
  effects(session, prompts, interventions)  per-position change of loss, KL, top-1 and routing
"""

import importlib
import sys
import types

from grokscope._version import __version__

# Where each public name lives; a name's module is imported on first use, so that importing
# one part (e.g. `grokscope.report`, `grokscope.store`) does not load the model.
_EXPORTS = {
    "CheckpointError": "checkpoint", "load_params": "formats", "save_params": "checkpoint",
    "GROK_1": "config", "GROK_2": "config", "GROK_TINY": "config", "GROK2_TINY": "config", "PRESETS": "config", "SMALL": "config", "TINY": "config",
    "ModelConfig": "config", "load_config": "config",
    "ForwardOutput": "runner", "forward": "runner", "init_params": "forward", "make_forward": "forward",
    "param_shapes": "layout",
    "QuantizedWeight8bit": "quant",
    "DumpError": "dump", "dump": "dump",
    "effects": "effects", "effects_baseline": "effects",
    "AttentionSpec": "record", "RecordSpec": "record",
    "Session": "session",
    "StoreError": "store", "open_store": "store", "token_pieces": "store", "verify_store": "store",
    "make_mesh": "sharding",
    "Tokenizer": "tokenizer",
}


class _Package(types.ModuleType):
    """Keeps `grokscope.forward`, `grokscope.dump` and `grokscope.effects` the functions: the
    import system sets a package attribute for every submodule it loads, which would otherwise
    replace each of them by its module of the same name."""

    def __setattr__(self, name, value):
        if isinstance(value, types.ModuleType) and name in _EXPORTS:
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package


def _in_a_kernel() -> bool:
    ipython = sys.modules.get("IPython")
    shell = ipython.get_ipython() if ipython is not None else None
    return shell is not None and getattr(shell, "kernel", None) is not None


if _in_a_kernel():
    # In a notebook, plotly figures carry an offline HTML copy (grokscope.widgets.offline), so
    # that an exported or kernel-less notebook still shows them.
    importlib.import_module("grokscope.widgets.offline").install_renderer()


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f"grokscope.{_EXPORTS[name]}"), name)
        globals()[name] = value
        return value
    if name == "interventions":
        return importlib.import_module("grokscope.interventions")
    raise AttributeError(f"module 'grokscope' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS) | {"interventions"})


__all__ = [
    "AttentionSpec", "DumpError", "Session", "StoreError", "dump", "effects", "effects_baseline", "interventions", "open_store",
    "token_pieces", "verify_store",
    "CheckpointError", "ForwardOutput", "GROK_1", "GROK_2", "GROK_TINY", "GROK2_TINY", "ModelConfig", "PRESETS", "QuantizedWeight8bit",
    "RecordSpec", "SMALL", "TINY", "Tokenizer", "forward", "init_params", "load_config",
    "load_params", "make_forward", "make_mesh", "param_shapes", "save_params",
]
