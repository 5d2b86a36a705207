r"""Greedy fill of masked byte spans: the model card's example as a command.

    python -m perceiver.fill_mask --checkpoint=language_perceiver_io_bytes.pickle \
        --text="This is an incomplete sentence where some words are[[ missing.]]"

Spans are marked in the text with ``[[...]]`` (their bytes are replaced by the mask id;
the original is shown beside the prediction) or given as byte offsets with
``--span=START:END`` (repeatable, end exclusive); empty, nested or overlapping spans are
refused. The text is taken as bytes (invalid UTF-8 included) and checked before the
checkpoint is read. The checkpoint may be DeepMind's pickle, this project's checkpoint,
or a Hugging Face directory; its parameters are checked against the model, by name.
"""

from __future__ import annotations

# First, before the imports below (JAX takes seconds): a signal while they run is
# handled (see perceiver/command/signal_guard.py).
from perceiver.command import signal_guard  # pylint: disable=g-bad-import-order

if __name__ == '__main__':
  signal_guard.install(stop_status=None)

import sys
from typing import List, Sequence, Tuple

from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

from perceiver.params import params_file
from perceiver.command import cli
from perceiver.command import errors
from perceiver.params import loading
from perceiver.model import layers
from perceiver.model import tokenizer as tokenizer_lib
from perceiver import transform

Span = Tuple[int, int]

_OPEN, _CLOSE = b'[[', b']]'


def parse_marked(text: bytes) -> Tuple[bytes, List[Span]]:
  """Removes ``[[``/``]]`` markers; returns the plain bytes and the marked byte spans.

  Raises:
    ConfigError: for an empty span (``[[]]``), a span inside another, or a marker
      without its partner; the message gives the byte offset in the text.
  """
  plain, spans, position, start = bytearray(), [], 0, None
  while True:
    next_open = text.find(_OPEN, position)
    next_close = text.find(_CLOSE, position)
    if next_open < 0 and next_close < 0:
      break
    if next_close < 0 or (0 <= next_open < next_close):
      if start is not None:
        raise errors.ConfigError(f'--text: "[[" at byte {next_open} opens a span inside '
                                 'another; spans cannot nest')
      plain += text[position:next_open]
      start, position = len(plain), next_open + len(_OPEN)
    else:
      if start is None:
        raise errors.ConfigError(f'--text: "]]" at byte {next_close} closes no span')
      plain += text[position:next_close]
      if len(plain) == start:
        raise errors.ConfigError(f'--text: the span ending at byte {next_close} is empty '
                                 '("[[]]"); mark at least one byte')
      spans.append((start, len(plain)))
      start, position = None, next_close + len(_CLOSE)
  if start is not None:
    raise errors.ConfigError('--text: a "[[" has no closing "]]"')
  plain += text[position:]
  return bytes(plain), spans


def parse_span(value: str, length: int) -> Span:
  """'START:END' byte offsets, checked against the text's length."""
  try:
    start, end = (int(x) for x in value.split(':'))
  except ValueError:
    raise errors.ConfigError(f'--span={value!r}: expected START:END byte offsets') from None
  if not 0 <= start < end <= length:
    raise errors.ConfigError(f'--span={value!r}: needs 0 <= START < END <= {length} '
                             '(text length)')
  return start, end


def check_spans(spans: Sequence[Span]) -> List[Span]:
  """The spans in order; refuses none at all, and spans that overlap."""
  if not spans:
    raise errors.ConfigError('nothing to fill: mark a span with [[...]] or pass '
                             '--span=START:END')
  spans = sorted(spans)
  for (a_start, a_end), (b_start, b_end) in zip(spans, spans[1:]):
    if b_start < a_end:
      raise errors.ConfigError(f'spans {a_start}:{a_end} and {b_start}:{b_end} overlap')
  return spans


def fill(params, config, data: bytes, spans: Sequence[Span]):
  """Masks ``spans`` of ``data`` and predicts them greedily in one forward pass.

  Returns:
    (masked ids [T], list of predicted ids per span, filled bytes).
  """
  tok = tokenizer_lib.BytesTokenizer()
  ids = tok.to_int(data)
  if len(ids) > config.max_seq_len:
    raise errors.ConfigError(f'--text is {len(ids)} bytes; the model reads at most '
                             f'{config.max_seq_len}')
  for start, end in check_spans(spans):
    ids[start:end] = tok.mask_token
  # Computes as this host's devices do best (XLA:CPU's kernels on a CPU).
  model = transform.masked_lm(config, platform=layers.platform())
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


def define_flags():
  """The command's flags, defined only when run as a command."""
  flags.DEFINE_string('checkpoint', None, 'DeepMind pickle, project checkpoint, or HF '
                      'directory.')
  flags.DEFINE_string('text', None, 'Text; mark spans to fill with [[...]].')
  flags.DEFINE_multi_string('span', [], 'Byte span START:END to mask (end exclusive).')


def main(argv):
  if len(argv) > 1:
    print(f'error: unexpected arguments {argv[1:]}', file=sys.stderr)
    return 2
  return cli.run(lambda: _command(FLAGS.checkpoint, FLAGS.text, FLAGS.span))


def _command(path: str, text: str, span_flags: Sequence[str]) -> int:
  tok = tokenizer_lib.BytesTokenizer()
  # The command line's bytes as given, invalid UTF-8 included (Python keeps them as
  # surrogate escapes): the model reads bytes.
  data, spans = parse_marked(text.encode('utf-8', errors='surrogateescape'))
  spans = check_spans(spans + [parse_span(s, len(data)) for s in span_flags])
  # Everything about the text is checked before the (possibly 800 MB) checkpoint is read.
  params, config, _ = loading.load_any(path)
  params_file.check_params(params, params_file.expected_shapes(transform.masked_lm(config),
                                                             config),
                          source=f'{path} (the masked language model)')
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
  def _define():
    define_flags()
    flags.mark_flags_as_required(['checkpoint', 'text'])

  cli.start(main, _define)
