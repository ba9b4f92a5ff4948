"""The Grok-1 architecture as haiku modules, with the release's parameter tree.

Shape glossary (used in the shape comments of every module):
  B  batch                     T  query positions          S  key positions
  D  emb_size                  K  key_size (head width)    H  num_q_heads
  G  num_kv_heads              R  H // G (queries per kv head)
  E  num_experts               k  num_selected_experts     F  ffn_size
  V  vocab_size

Parameter tree (module path / parameter), identical to the release:
  language_model/in_out_embed/embeddings           [V, D]
  language_model/rms_norm/scale                    [D]
  transformer/decoder_layer_{i}/multi_head_attention/{query,key,value,linear}/w
  transformer/decoder_layer_{i}/moe/{linear,linear_v,linear_1}/w   [E, D, F] / [E, F, D]
  transformer/decoder_layer_{i}/router/w           [D, E]
  transformer/decoder_layer_{i}/rms_norm{,_1,_2,_3}/scale
"""

from grokscope.model.lm import forward_fn

__all__ = ["forward_fn"]
