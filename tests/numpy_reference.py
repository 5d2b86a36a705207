"""An independent float64 numpy implementation of the Perceiver IO language forward pass.

Written from the paper's equations and the released parameter layout (attention's four
projections are linear..linear_3 = Q, K, V, output; pre-norm blocks; GELU in its tanh
form; masked logits at -1e30; fully masked query rows output zeros), sharing no code with
the package, so the Haiku model can be checked against it.
"""

import math

import numpy as np


def _ln(x, p):
  mean = x.mean(-1, keepdims=True)
  var = ((x - mean) ** 2).mean(-1, keepdims=True)
  return (x - mean) / np.sqrt(var + 1e-5) * p['scale'] + p['offset']


def _lin(x, p):
  return x @ p['w'] + p['b']


def _gelu(x):
  return 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)))


def _softmax(x):
  x = x - x.max(-1, keepdims=True)
  e = np.exp(x)
  return e / e.sum(-1, keepdims=True)


def attention(params, prefix, xq, xkv, heads, mask=None):
  """xq [N, Cq], xkv [M, Ckv], mask [N, M] or None -> [N, out]."""
  q = _lin(xq, params[prefix + '/linear'])
  k = _lin(xkv, params[prefix + '/linear_1'])
  v = _lin(xkv, params[prefix + '/linear_2'])
  n = q.shape[0]
  dq, dv = q.shape[1] // heads, v.shape[1] // heads
  out = np.zeros((n, heads * dv))
  for h in range(heads):
    logits = q[:, h * dq:(h + 1) * dq] @ k[:, h * dq:(h + 1) * dq].T / math.sqrt(dq)
    if mask is not None:
      logits = np.where(mask > 0, logits, -1e30)
    out[:, h * dv:(h + 1) * dv] = _softmax(logits) @ v[:, h * dv:(h + 1) * dv]
  if mask is not None:
    out[(mask == 0).all(axis=1)] = 0.0
  return _lin(out, params[prefix + '/linear_3'])


def _mlp(params, prefix, x):
  return _lin(_gelu(_lin(x, params[prefix + '/linear'])), params[prefix + '/linear_1'])


def cross_block(params, prefix, xq, xkv, heads, mask, query_residual):
  att = attention(params, prefix + '/attention', _ln(xq, params[prefix + '/layer_norm']),
                  _ln(xkv, params[prefix + '/layer_norm_1']), heads, mask)
  x = xq + att if query_residual else att
  return x + _mlp(params, prefix + '/mlp', _ln(x, params[prefix + '/layer_norm_2']))


def self_block(params, prefix, x, heads):
  h = _ln(x, params[prefix + '/layer_norm'])
  x = x + attention(params, prefix + '/attention', h, h, heads)
  return x + _mlp(params, prefix + '/mlp', _ln(x, params[prefix + '/layer_norm_1']))


def masked_lm_logits(haiku_params, config, ids, mask):
  """ids, mask [T] -> logits [T, vocab] for one sequence, in float64."""
  params = {m: {n: np.asarray(v, np.float64) for n, v in d.items()}
            for m, d in haiku_params.items()}
  enc, dec = config.encoder, config.decoder
  t = len(ids)
  emb = params['embed']['embeddings']
  x = emb[ids] + params['trainable_position_encoding']['pos_embs'][:t]
  z = params['perceiver_encoder/~/trainable_position_encoding']['pos_embs']
  z = cross_block(params, 'perceiver_encoder/~/cross_attention', z, x,
                  enc.num_cross_attend_heads,
                  np.ones((z.shape[0], 1)) * mask[None, :], enc.use_query_residual)
  names = ['self_attention'] + [f'self_attention_{i}'
                                for i in range(1, enc.num_self_attends_per_block)]
  for _ in range(enc.num_blocks):
    for name in names:
      z = self_block(params, 'perceiver_encoder/~/' + name, z, enc.num_self_attend_heads)
  queries = params['basic_decoder/~/trainable_position_encoding']['pos_embs'][:t]
  out = cross_block(params, 'basic_decoder/cross_attention', queries, z, dec.num_heads,
                    mask[:, None] * np.ones((1, z.shape[0])), dec.use_query_residual)
  return out @ emb.T + params['embedding_decoder']['bias']
