"""UTF-8 byte tokenizer with the ids of DeepMind's released language model.

Ids 0..5 are reserved (pad, bos, eos, mask, cls, sep); byte ``b`` is id ``b + 6``,
so the vocabulary has 262 entries. There is nothing to train.
"""

from __future__ import annotations

from typing import Iterable, NamedTuple, Sequence, Union

import numpy as np

PAD_ID = 0
BOS_ID = 1
EOS_ID = 2
MASK_ID = 3
CLS_ID = 4
SEP_ID = 5
NUM_SPECIAL = 6
VOCAB_SIZE = 256 + NUM_SPECIAL

Text = Union[str, bytes]


class EncodedBatch(NamedTuple):
  """A batch encoded to a fixed length.

  Attributes:
    input_ids: int32 [batch, length], padded with ``PAD_ID``.
    input_mask: int32 [batch, length], 1 for real positions, 0 for padding.
    truncated: bool [batch], whether an example was cut to fit ``length``.
  """
  input_ids: np.ndarray
  input_mask: np.ndarray
  truncated: np.ndarray


class BytesTokenizer:
  """Maps text to UTF-8 byte ids and back."""

  pad_token = PAD_ID
  bos_token = BOS_ID
  eos_token = EOS_ID
  mask_token = MASK_ID
  cls_token = CLS_ID
  sep_token = SEP_ID
  num_special_tokens = NUM_SPECIAL
  vocab_size = VOCAB_SIZE

  def to_int(self, text: Text) -> np.ndarray:
    """Encodes ``text`` (str as UTF-8, or raw bytes) to int32 ids [len]."""
    if isinstance(text, str):
      text = text.encode('utf-8')
    elif not isinstance(text, (bytes, bytearray, memoryview)):
      raise TypeError(f'to_int expects str or bytes, got {type(text).__name__}')
    return np.frombuffer(bytes(text), dtype=np.uint8).astype(np.int32) + NUM_SPECIAL

  def to_bytes(self, ids: Iterable[int]) -> bytes:
    """Decodes ids to raw bytes, dropping special and out-of-range ids."""
    ids = np.asarray(ids, dtype=np.int64).reshape(-1)
    keep = ids[(ids >= NUM_SPECIAL) & (ids < VOCAB_SIZE)]
    return (keep - NUM_SPECIAL).astype(np.uint8).tobytes()

  def to_string(self, ids: Iterable[int]) -> str:
    """Decodes ids to text; invalid UTF-8 becomes U+FFFD, never an exception."""
    return self.to_bytes(ids).decode('utf-8', errors='replace')

  def encode_batch(
      self,
      texts: Sequence[Text],
      length: int,
      *,
      add_cls: bool = False,
      pairs: Sequence[Text] | None = None,
  ) -> EncodedBatch:
    """Encodes texts (or text pairs joined by SEP) to a fixed ``length``.

    Args:
      texts: the first (or only) segment of each example.
      length: the fixed output length; longer examples are truncated.
      add_cls: prepend CLS to every example.
      pairs: optional second segments; each pair is ``a SEP b``. When a pair is too
        long, the longer segment is cut first, one byte at a time, as BERT does.

    Returns:
      An ``EncodedBatch``.
    """
    if length <= 0:
      raise ValueError(f'length must be positive, got {length}')
    if pairs is not None and len(pairs) != len(texts):
      raise ValueError(f'{len(texts)} texts but {len(pairs)} pairs')
    ids = np.full((len(texts), length), PAD_ID, np.int32)
    mask = np.zeros((len(texts), length), np.int32)
    truncated = np.zeros((len(texts),), bool)
    prefix = [CLS_ID] if add_cls else []
    for i, text in enumerate(texts):
      a = self.to_int(text)
      if pairs is None:
        room = length - len(prefix)
        truncated[i] = len(a) > room
        row = np.concatenate([prefix, a[:room]]).astype(np.int32)
      else:
        b = self.to_int(pairs[i])
        room = length - len(prefix) - 1
        truncated[i] = len(a) + len(b) > room
        a, b = _truncate_pair(a, b, room)
        row = np.concatenate([prefix, a, [SEP_ID], b]).astype(np.int32)
      ids[i, :len(row)] = row
      mask[i, :len(row)] = 1
    return EncodedBatch(ids, mask, truncated)


def _truncate_pair(a: np.ndarray, b: np.ndarray, room: int):
  """Cuts the longer of two segments (ties: the second) until both fit in ``room``."""
  room = max(room, 0)
  la, lb = len(a), len(b)
  if la + lb > room:
    if min(la, lb) * 2 <= room:  # only the longer one needs cutting
      la, lb = (room - lb, lb) if la > lb else (la, room - la)
    else:  # both cut to half, the first keeping the odd byte
      la, lb = (room + 1) // 2, room // 2
  return a[:la], b[:lb]
