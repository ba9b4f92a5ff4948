"""The zarr v3 store of a dump. Every public name of the package is importable from here.

  schema          the store's layout (arrays, dims, dtypes, chunks), derived from the quantity
                  registry of `grokscope.record`; `SCHEMA_VERSION`; the metadata-column rules;
                  `StoreError`
  writer          `create`, `write_batch` (`row_blocks`, `mask_padding`), the background
                  `StoreWriter`
  zarr_internals  the zarr internals the fast chunk path and `check_store` use, with the zarr
                  versions they were tested with
  staging         creating a store atomically beside its path, and the lock held while writing it
  frames          chunk framing checks: a damaged chunk object is an error naming it
  verify          `check_store`, `StoreCheck`, `verify_store`
  reader          `open_store`, `dataset_from_arrays`, `token_pieces`, `describe`
"""

from grokscope.store.reader import dataset_from_arrays, describe, open_store, token_pieces
from grokscope.store.schema import (RESERVED_NAMES, SCHEMA_VERSION, StoreError, Variable, column_dtype, layout,
                                    metadata_column_problem, metadata_name_problem, metadata_value_problem,
                                    record_bytes_per_token)
from grokscope.store.verify import StoreCheck, check_store, verify_store
from grokscope.store.writer import StoreWriter, create, mask_padding, row_blocks, write_batch

__all__ = ["Variable", "layout", "record_bytes_per_token", "create", "row_blocks", "write_batch", "StoreWriter",
           "open_store", "token_pieces", "dataset_from_arrays", "describe", "column_dtype", "mask_padding",
           "StoreError", "RESERVED_NAMES", "metadata_name_problem", "metadata_value_problem",
           "metadata_column_problem", "SCHEMA_VERSION", "StoreCheck", "check_store", "verify_store"]
