"""Analytical matmul FLOP counts of the masked LM (2 FLOPs per multiply-add).

Only matrix products are counted (projections, attention logits and weighted sums, MLPs,
the tied output layer); layer norms, softmax and GELU add well under 1%. A train step is
counted as 3x the forward (the backward pass computes two products per forward product).
"""

from __future__ import annotations


def _attention(nq, nkv, cq, ckv, qk, v, out):
  """Projections + logits + weighted sum + output projection."""
  return 2 * (nq * cq * qk + nkv * ckv * qk + nkv * ckv * v + nq * nkv * qk + nq * nkv * v
              + nq * v * out)


def _mlp(n, c, widening):
  return 2 * 2 * n * c * widening * c


def masked_lm_forward(config, seq_len: int, num_queries: int | None = None) -> int:
  """FLOPs of one sequence's forward pass; ``num_queries`` decoded positions (default all)."""
  enc, dec = config.encoder, config.decoder
  d, t = config.d_model, seq_len
  n, cz = enc.z_index_dim, enc.num_z_channels
  q = t if num_queries is None else num_queries
  qk = enc.get('qk_channels') or cz
  v = enc.get('v_channels') or qk
  cross_qk = enc.get('qk_channels') or (d if enc.get('cross_attention_shape_for_attn',
                                                     'kv') == 'kv' else cz)
  cross_v = enc.get('v_channels') or cross_qk
  total = _attention(n, t, cz, d, cross_qk, cross_v, cz)
  total += _mlp(n, cz, enc.get('cross_attend_widening_factor', 1))
  layers = enc.num_self_attends_per_block * enc.get('num_blocks', 1)
  total += layers * (_attention(n, n, cz, cz, qk, v, cz)
                     + _mlp(n, cz, enc.get('self_attend_widening_factor', 1)))
  cq = dec.trainable_position_encoding_kwargs.num_channels
  dqk = dec.get('qk_channels') or cz
  dv = dec.get('v_channels') or dqk
  total += _attention(q, n, cq, cz, dqk, dv, cq) + _mlp(q, cq, 1)
  out = cq
  if dec.get('final_project', True):
    total += 2 * q * cq * dec.output_num_channels
    out = dec.output_num_channels
  total += 2 * q * out * config.vocab_size
  return total


def masked_lm_train_step(config, seq_len: int, batch: int,
                         num_queries: int | None = None) -> int:
  """FLOPs of a train step (forward + backward) on ``batch`` sequences."""
  return 3 * batch * masked_lm_forward(config, seq_len, num_queries)
