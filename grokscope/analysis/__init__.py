"""Routing metrics over a store's Dataset (from `open_store` or `Session.run`).

Every function is pure (`xarray.Dataset -> xarray.DataArray | Dataset`), excludes padding
(positions >= `length`) everywhere, and stays lazy on dask-backed stores. Definitions and
their sources: see each function's docstring.
"""

from grokscope.analysis.common import router_probs, synthetic_store, valid_tokens

__all__ = ["router_probs", "synthetic_store", "valid_tokens"]
