"""grokscope: an interpretability workbench for Grok-1's mixture-of-experts routing.

The public API:
  ModelConfig, GROK_1       model hyper-parameters (official field names) and the release's values
  RecordSpec                what the forward records besides logits
  param_shapes(config)      {path: (shape, dtype)} of every checkpoint tensor, in checkpoint order
  make_mesh(data, model)    a ("data", "model") device mesh
  load_params(dir, config)  the release's ckpt-0 layout, validated, placed on a mesh
  forward(params, config, tokens, record, mesh)  -> .logits, .record
  Session                   a loaded model; session.run(text) -> xarray.Dataset
  dump(prompts, out, ...)   prompts -> zarr store (resumable); open_store(path_or_url) -> xarray.Dataset
  verify_store(path_or_url, deep=False)  the problems of a damaged store, each naming its array and chunk
  interventions             ban / zero / force / swap / renormalise / ablate_head, for forward(..., interventions=)
  effects(session, prompts, interventions)  per-position change of loss, KL, top-1 and routing
"""

from grokscope.checkpoint import CheckpointError, load_params, save_params
from grokscope.config import GROK_1, GROK_TINY, PRESETS, SMALL, TINY, ModelConfig, load_config
from grokscope.forward import ForwardOutput, forward, init_params, make_forward, param_shapes
from grokscope.quant import QuantizedWeight8bit
from grokscope.dump import DumpError, dump
from grokscope.effects import effects, effects_baseline
from grokscope import interventions
from grokscope.record import AttentionSpec, RecordSpec
from grokscope.session import Session
from grokscope.store import StoreError, open_store, token_pieces, verify_store
from grokscope.sharding import make_mesh
from grokscope.tokenizer import Tokenizer

from grokscope._version import __version__

__all__ = [
    "AttentionSpec", "DumpError", "Session", "StoreError", "dump", "effects", "effects_baseline", "interventions", "open_store",
    "token_pieces", "verify_store",
    "CheckpointError", "ForwardOutput", "GROK_1", "GROK_TINY", "ModelConfig", "PRESETS", "QuantizedWeight8bit",
    "RecordSpec", "SMALL", "TINY", "Tokenizer", "forward", "init_params", "load_config",
    "load_params", "make_forward", "make_mesh", "param_shapes", "save_params",
]
