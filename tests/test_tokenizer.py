"""BytesTokenizer: the original's ids, lossless round trips, fixed-length batches."""

import numpy as np
import pytest

from perceiver.model import tokenizer as tok_lib

TOK = tok_lib.BytesTokenizer()


def test_special_ids_and_vocab_match_the_original():
  assert (TOK.pad_token, TOK.bos_token, TOK.eos_token, TOK.mask_token, TOK.cls_token,
          TOK.sep_token) == (0, 1, 2, 3, 4, 5)
  assert TOK.vocab_size == 262
  # Byte b is id b + 6: 'A' is 0x41 = 65.
  np.testing.assert_array_equal(TOK.to_int('A\x00\xff'.encode('latin-1')), [71, 6, 261])
  np.testing.assert_array_equal(TOK.to_int('é'), [0xC3 + 6, 0xA9 + 6])
  assert TOK.to_int('x').dtype == np.int32


@pytest.mark.parametrize('seed', range(5))
def test_random_bytes_round_trip_including_invalid_utf8(seed):
  data = np.random.default_rng(seed).integers(0, 256, size=300, dtype=np.uint8).tobytes()
  ids = TOK.to_int(data)
  assert ids.min() >= 6 and ids.max() <= 261
  assert TOK.to_bytes(ids) == data
  # to_string never raises; it is Python's own lossy decoding of the same bytes.
  assert TOK.to_string(ids) == data.decode('utf-8', errors='replace')


def test_to_string_drops_special_ids_and_replaces_invalid_utf8():
  ids = [TOK.cls_token] + TOK.to_int('ab').tolist() + [TOK.mask_token, 0xFF + 6,
                                                       TOK.pad_token]
  assert TOK.to_string(ids) == 'ab\ufffd'
  assert TOK.to_string(np.array([], np.int32)) == ''


def test_encode_batch_pads_truncates_and_masks():
  batch = TOK.encode_batch(['abc', 'abcdefgh'], length=5)
  np.testing.assert_array_equal(batch.input_ids[0], [103, 104, 105, 0, 0])
  np.testing.assert_array_equal(batch.input_mask, [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
  np.testing.assert_array_equal(batch.truncated, [False, True])
  assert TOK.to_string(batch.input_ids[1]) == 'abcde'


def test_encode_batch_pairs_use_sep_and_optional_cls():
  batch = TOK.encode_batch(['ab'], length=8, pairs=['c'], add_cls=True)
  np.testing.assert_array_equal(batch.input_ids[0], [4, 103, 104, 5, 105, 0, 0, 0])
  np.testing.assert_array_equal(batch.input_mask[0], [1, 1, 1, 1, 1, 0, 0, 0])


def _truncate_by_steps(la, lb, room):
  while la + lb > room:
    if la > lb:
      la -= 1
    else:
      lb -= 1
  return la, lb


def test_pair_truncation_cuts_the_longer_segment_first():
  for la in range(9):
    for lb in range(9):
      for room in range(12):
        a, b = tok_lib._truncate_pair(np.arange(la), np.arange(lb), room)
        assert (len(a), len(b)) == _truncate_by_steps(la, lb, room), (la, lb, room)


def test_bad_input_types_are_named():
  with pytest.raises(TypeError, match='str or bytes'):
    TOK.to_int(123)
  with pytest.raises(ValueError, match='length must be positive'):
    TOK.encode_batch(['a'], length=0)
