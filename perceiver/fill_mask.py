r"""Greedy fill of masked byte spans: the model card's example as a command.

    python -m perceiver.fill_mask --checkpoint=language_perceiver_io_bytes.pickle \
        --text="This is an incomplete sentence where some words are[[ missing.]]"

Spans are marked in the text with ``[[...]]`` (their bytes are replaced by the mask id;
the original is shown beside the prediction) or given as byte offsets with
``--span=START:END`` (repeatable, end exclusive). The checkpoint may be DeepMind's pickle,
this project's checkpoint, or a Hugging Face directory.
"""

from __future__ import annotations

import re
import sys
from typing import List, Sequence, Tuple

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

from perceiver import checkpoint
from perceiver import tokenizer as tokenizer_lib
from perceiver import transform

Span = Tuple[int, int]

_MARK = re.compile(rb'\[\[(.*?)\]\]', re.DOTALL)


def parse_marked(text: bytes) -> Tuple[bytes, List[Span]]:
  """Removes ``[[``/``]]`` markers; returns the plain bytes and the marked byte spans."""
  plain, spans, last = bytearray(), [], 0
  for match in _MARK.finditer(text):
    plain += text[last:match.start()]
    start = len(plain)
    plain += match.group(1)
    spans.append((start, len(plain)))
    last = match.end()
  plain += text[last:]
  return bytes(plain), spans


def parse_span(value: str, length: int) -> Span:
  """'START:END' byte offsets, checked against the text's length."""
  try:
    start, end = (int(x) for x in value.split(':'))
  except ValueError:
    raise ValueError(f'--span={value!r}: expected START:END byte offsets') from None
  if not 0 <= start < end <= length:
    raise ValueError(f'--span={value!r}: needs 0 <= START < END <= {length} (text length)')
  return start, end


def fill(params, config, data: bytes, spans: Sequence[Span]):
  """Masks ``spans`` of ``data`` and predicts them greedily in one forward pass.

  Returns:
    (masked ids [T], list of predicted ids per span, filled bytes).
  """
  tok = tokenizer_lib.BytesTokenizer()
  ids = tok.to_int(data)
  if len(ids) > config.max_seq_len:
    raise ValueError(f'text is {len(ids)} bytes; the model reads at most '
                     f'{config.max_seq_len}')
  if not spans:
    raise ValueError('nothing to fill: mark a span with [[...]] or pass --span=START:END')
  for start, end in spans:
    ids[start:end] = tok.mask_token
  model = transform.masked_lm(config)
  logits = jax.jit(model.apply)(params, None, jnp.asarray(ids[None]),
                                jnp.ones((1, len(ids)), jnp.int32))
  predicted = np.asarray(jnp.argmax(logits[0], axis=-1))
  filled = ids.copy()
  per_span = []
  for start, end in spans:
    filled[start:end] = predicted[start:end]
    per_span.append(predicted[start:end])
  return ids, per_span, tok.to_bytes(filled)


FLAGS = flags.FLAGS
flags.DEFINE_string('checkpoint', None, 'DeepMind pickle, project checkpoint, or HF directory.')
flags.DEFINE_string('text', None, 'Text; mark spans to fill with [[...]].')
flags.DEFINE_multi_string('span', [], 'Byte span START:END to mask (end exclusive).')


def main(argv):
  del argv
  tok = tokenizer_lib.BytesTokenizer()
  data, spans = parse_marked(FLAGS.text.encode('utf-8'))
  spans += [parse_span(s, len(data)) for s in FLAGS.span]
  params, config, _ = checkpoint.load_any(FLAGS.checkpoint)
  spans = sorted(spans)
  _, per_span, filled = fill(params, config, data, spans)
  show = lambda b: b.decode('utf-8', errors='replace')
  shown = bytearray(data)
  for start, end in spans:
    shown[start:end] = b'_' * (end - start)
  print(f'masked: {show(bytes(shown))!r} ({sum(e - s for s, e in spans)} bytes, shown as _)')
  for (start, end), ids in zip(spans, per_span):
    print(f'span {start}:{end} was {show(data[start:end])!r} -> {tok.to_string(ids)!r} '
          f'ids {ids.tolist()}')
  print(f'filled: {show(filled)}')
  return 0


if __name__ == '__main__':
  flags.mark_flags_as_required(['checkpoint', 'text'])
  sys.exit(app.run(main))
