"""Routing metrics over a store's Dataset (from `open_store` or `Session.run`).

Every function is pure (`xarray.Dataset -> xarray.DataArray | Dataset`), excludes padding
(positions >= `length`) everywhere, and puts a null baseline next to its number (in `attrs`
or as a variable). Each docstring gives the definition and its source.

  load               hard_load, soft_load, balance_loss, load_cv, max_vio, drop_rate, load_entropy
  shape              router_entropy, mean_router_entropy, topk_gate_mass, router_margins
  temporal           repetition_rate and its random, load-aware and shuffle baselines
  specialization     group_load, vocabulary_specialization, top_tokens_per_expert, coactivation,
                     expert_enrichment (with a permutation p-value)
  paths              transition_matrix, transition_information, layer_information,
                     path_statistics, top_paths
  compare            routing_agreement, flip_margin
  attribution        ffn_shares, readout_weights, direct_logit_attribution (routed vs dense
                     FFN updates, each chosen expert's direct contribution to a logit)
"""

from grokscope.analysis.attribution import direct_logit_attribution, ffn_shares, readout_weights
from grokscope.analysis.common import router_probs, synthetic_store, valid_tokens
from grokscope.analysis.compare import DEFAULT_MARGIN_BINS, flip_margin, routing_agreement
from grokscope.analysis.load import (balance_loss, drop_rate, expert_counts, hard_load, load_cv,
                                     load_cv_sampling_baseline, load_entropy, max_vio, soft_load)
from grokscope.analysis.paths import (layer_information, path_statistics, top_paths, transition_information,
                                      transition_matrix)
from grokscope.analysis.shape import layer_mean, mean_router_entropy, router_entropy, router_margins, topk_gate_mass
from grokscope.analysis.specialization import (coactivation, expert_enrichment, group_load, top_tokens_per_expert,
                                               vocabulary_specialisation, vocabulary_specialization)
from grokscope.analysis.temporal import (load_aware_repetition_baseline, random_repetition_baseline,
                                         repetition_rate, repetition_shuffle_test, repetition_test,
                                         shuffle_expected_repetition)

__all__ = [
    "DEFAULT_MARGIN_BINS", "balance_loss", "coactivation", "direct_logit_attribution", "drop_rate", "expert_counts",
    "expert_enrichment", "ffn_shares", "flip_margin", "group_load", "hard_load", "layer_information", "layer_mean",
    "load_aware_repetition_baseline", "load_cv", "load_cv_sampling_baseline", "load_entropy", "max_vio",
    "mean_router_entropy", "path_statistics", "random_repetition_baseline", "readout_weights", "repetition_rate",
    "repetition_shuffle_test", "repetition_test", "router_entropy", "router_margins", "router_probs",
    "routing_agreement", "shuffle_expected_repetition", "soft_load", "synthetic_store", "top_paths",
    "top_tokens_per_expert", "topk_gate_mass", "transition_information", "transition_matrix", "valid_tokens",
    "vocabulary_specialization",
]
