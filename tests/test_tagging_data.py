"""Tagging data (eval.tagging.data): readers, word-to-byte alignment and windows, checked
against positions and splits worked out by hand."""

import numpy as np
import pytest

from eval.tagging import data as tagging_data
from eval.tagging import task as tagging_task

CONLL = """-DOCSTART- -X- -X- O

Zürich NNP B-NP B-LOC
's POS B-NP O
café NN I-NP O
! . O O



Müller NNP B-NP B-PER
-DOCSTART- -X- -X- O
Solo NN B-NP O
"""


def _write(tmp_path, name, text):
  path = tmp_path / name
  path.write_text(text, encoding='utf-8')
  return str(path)


def test_conll2003_sentences_skip_docstart_and_blank_lines_and_keep_line_numbers(tmp_path):
  sentences = tagging_data.read_conll2003(_write(tmp_path, 'train.txt', CONLL))
  assert [s.words for s in sentences] == [('Zürich', "'s", 'café', '!'), ('Müller',),
                                          ('Solo',)]
  assert [s.tags for s in sentences] == [('B-LOC', 'O', 'O', 'O'), ('B-PER',), ('O',)]
  assert [s.lines for s in sentences] == [(3, 4, 5, 6), (10,), (12,)]   # 3 blank lines
  pos = tagging_data.read_conll2003(str(tmp_path / 'train.txt'), label_column=1)
  assert pos[0].tags == ('NNP', 'POS', 'NN', '.')


def test_each_word_s_tag_sits_on_its_first_byte():
  # 'Zürich' is 7 bytes (ü is 2), "'s" 2, 'café' 5 (é is 2), '!' 1; one space between.
  assert tagging_data.word_offsets(['Zürich', "'s", 'café', '!']) == [0, 8, 11, 17]
  split = tagging_data.Split('dev', 'dev.txt', [
      tagging_data.Sentence(('Zürich', "'s", 'café', '!'), ('B-LOC', 'O', 'O', 'O'),
                            (1, 2, 3, 4)),
      tagging_data.Sentence(('Müller',), ('B-PER',), (6,))])
  labels = ['O', 'B-LOC', 'B-PER']
  enc = tagging_data.encode_split(split, labels, max_seq_len=32, overlap=8,
                                  length_multiple=8, slot_multiple=4)
  text = 'Zürich \'s café !'.encode('utf-8')
  assert len(text) == 18 and enc.length == 24 and enc.positions.shape == (2, 4)
  np.testing.assert_array_equal(enc.input_ids[0, :18], np.frombuffer(text, np.uint8) + 6)
  assert enc.input_ids[0, 18:].tolist() == [0] * 6 and enc.input_mask[0].sum() == 18
  assert enc.positions[0].tolist() == [0, 8, 11, 17]
  assert enc.labels[0].tolist() == [1, 0, 0, 0] and enc.weights[0].tolist() == [1] * 4
  # The bytes at those positions are the words' first bytes: Z, ', c, !
  assert [chr(enc.input_ids[0, p] - 6) for p in enc.positions[0]] == ['Z', "'", 'c', '!']
  assert enc.positions[1].tolist() == [0, 0, 0, 0] and enc.slot_mask[1].tolist() == [1, 0, 0, 0]
  assert enc.labels[1, 0] == 2 and enc.weights[1].tolist() == [1, 0, 0, 0]
  assert enc.word_ids.tolist() == [[0, 1, 2, 3], [4, -1, -1, -1]]
  # Predictions per slot come back one per word: here argmax picks the slot's own tag.
  logits = np.eye(3)[enc.labels]
  assert tagging_task.predicted_tags(logits, enc, labels) == [['B-LOC', 'O', 'O', 'O'],
                                                             ['B-PER']]


def test_windows_share_words_and_score_each_word_once():
  # Five 3-byte words, 11-byte windows (3 words), 3 bytes shared (1 word): the shared
  # word is scored by the first window, the second scores the last two.
  W = tagging_data.Window
  assert tagging_data.plan_windows([3] * 5, 11, 3) == [W(0, 3, 0, 3), W(2, 5, 3, 5)]
  # 7 bytes shared (2 words): the shared pair is split at its middle.
  assert tagging_data.plan_windows([3] * 6, 11, 7) == [
      W(0, 3, 0, 2), W(1, 4, 2, 3), W(2, 5, 3, 4), W(3, 6, 4, 6)]
  # No overlap: consecutive whole-word windows.
  assert tagging_data.plan_windows([3] * 5, 7, 0) == [W(0, 2, 0, 2), W(2, 4, 2, 4),
                                                     W(4, 5, 4, 5)]
  # A word longer than a window stands alone.
  assert tagging_data.plan_windows([2, 20, 2], 8, 2) == [W(0, 1, 0, 1), W(1, 2, 1, 2),
                                                         W(2, 3, 2, 3)]


def test_a_long_sentence_is_split_not_cut_and_read_back_whole():
  words = [f'w{i:02d}' for i in range(12)]           # 3 bytes each: 47 bytes in all
  split = tagging_data.Split('train', 't.txt', [
      tagging_data.Sentence(tuple(words), tuple('O' if i % 3 else 'B-X' for i in range(12)),
                            tuple(range(1, 13))),
      tagging_data.Sentence(('longwordlongword', 'b'), ('B-X', 'O'), (14, 15))])
  enc = tagging_data.encode_split(split, ['O', 'B-X'], max_seq_len=16, overlap=4,
                                  length_multiple=8)
  # The 16-byte word fills a window alone: not cut (only longer words are).
  assert enc.num_split_sentences == 2 and enc.num_cut_words == 0
  assert enc.weights.sum() == 14                      # every word scored once
  assert sorted(enc.word_ids[enc.word_ids >= 0].tolist()) == list(range(14))
  for row in range(len(enc)):                         # no window is longer than 16 bytes
    assert enc.input_mask[row].sum() <= 16
    for slot in np.flatnonzero(enc.slot_mask[row]):
      word = enc.input_ids[row, enc.positions[row, slot]]
      assert word in (ord('w') + 6, ord('l') + 6, ord('b') + 6)
  enc2 = tagging_data.encode_split(split, ['O', 'B-X'], max_seq_len=15, overlap=4)
  assert enc2.num_cut_words == 1 and enc2.input_mask.sum(axis=1).max() == 15
  back = tagging_data.words_from_windows(enc, enc.labels)
  assert back == [[0 if i % 3 else 1 for i in range(12)], [1, 0]]


def test_conllu_reads_upos_of_syntactic_words(tmp_path):
  text = ('# sent_id = 1\n# text = Vámonos al mar.\n'
          '1\tVámonos\tir\tVERB\t_\t_\t0\troot\t_\t_\n'
          '2-3\tal\t_\t_\t_\t_\t_\t_\t_\t_\n'
          '2\ta\ta\tADP\t_\t_\t4\tcase\t_\t_\n'
          '3\tel\tel\tDET\t_\t_\t4\tdet\t_\t_\n'
          '3.1\tx\tx\tX\t_\t_\t_\t_\t_\t_\n'
          '4\tmar\tmar\tNOUN\t_\t_\t1\tobl\t_\t_\n'
          '5\t.\t.\tPUNCT\t_\t_\t1\tpunct\t_\t_\n\n')
  (tmp_path / 'en_test-ud-train.conllu').write_text(text, encoding='utf-8')
  (tmp_path / 'en_test-ud-dev.conllu').write_text(text, encoding='utf-8')
  split = tagging_data.load_split(str(tmp_path), 'conllu', 'train')
  [sentence] = split.sentences
  assert sentence.words == ('Vámonos', 'a', 'el', 'mar', '.')
  assert sentence.tags == ('VERB', 'ADP', 'DET', 'NOUN', 'PUNCT')
  assert sentence.lines == (3, 5, 6, 8, 9)
  assert not tagging_task.is_iob(tagging_data.label_list(split))


@pytest.mark.parametrize('text, line, message', [
    ('EU B-ORG\nrejects\n', 2, 'expected "word ... tag"'),
    ('EU B-ORG\n\xff\n', 2, 'not UTF-8'),
])
def test_a_malformed_line_names_file_and_line(tmp_path, text, line, message):
  path = tmp_path / 'train.txt'
  path.write_bytes(text.encode('latin-1') if '\xff' in text else text.encode())
  with pytest.raises(tagging_data.TaggingDataError) as e:
    tagging_data.read_conll2003(str(path))
  assert f'{path}:{line}: ' in str(e.value) and message in str(e.value)


def test_bad_conllu_lines_and_unknown_dev_tags_are_named(tmp_path):
  bad = tmp_path / 'x-train.conllu'
  bad.write_text('# c\n1\tword\tNOUN\n', encoding='utf-8')
  with pytest.raises(tagging_data.TaggingDataError, match=f'{bad}:2: expected 10'):
    tagging_data.read_conllu(str(bad))
  _write(tmp_path, 'train.txt', 'EU NNP B-NP B-ORG\nrejects VBZ B-VP O\n')
  _write(tmp_path, 'valid.txt', 'Peter NNP B-NP O\n\nBlackburn NNP B-NP B-MISC\n')
  splits = tagging_data.all_splits(str(tmp_path), 'conll2003', None, with_test=True)
  assert set(splits) == {'train', 'dev'}
  labels = tagging_data.label_list(splits['train'])
  assert labels == ['O', 'B-ORG']
  with pytest.raises(tagging_data.TaggingDataError) as e:
    tagging_data.check_tags(splits['dev'], labels)
  assert f"{tmp_path / 'valid.txt'}:3: tag 'B-MISC' does not occur in the training file" in (
      str(e.value))
  (tmp_path / 'valid.txt').unlink()
  with pytest.raises(tagging_data.TaggingDataError, match='no dev file .*valid.txt'):
    tagging_data.all_splits(str(tmp_path), 'conll2003', None, with_test=False)


_UD_LINES = ('# sent_id = 1\n# text = Vámonos al mar.\n'
             '1\tVámonos\tir\tVERB\t_\t_\t0\troot\t_\t_\n'
             '2\tmar\tmar\tNOUN\t_\t_\t1\tobl\t_\tSpaceAfter=No\n\n')


@pytest.mark.parametrize('fmt, name, text, line, message', [
    # CoNLL-U read as CoNLL-2003: its comment, or its first token line without comments.
    ('conll2003', 'train.txt', _UD_LINES, 1, 'a CoNLL-U line'),
    ('conll2003', 'train.txt', _UD_LINES.split('\n', 2)[2], 1, 'a CoNLL-U line'),
    ('conll2003', 'train.txt', 'EU B-ORG\n\n1-2\tal\t_\t_\t_\t_\t_\t_\t_\t_\n', 3,
     'a CoNLL-U line'),
    # CoNLL-2003 read as CoNLL-U: its document marker, a token line, a two-column line.
    ('conllu', 'x-train.conllu', '-DOCSTART- -X- -X- O\n\nEU NNP B-NP B-ORG\n', 1,
     'a CoNLL-2003 line'),
    ('conllu', 'x-train.conllu', 'EU NNP B-NP B-ORG\n', 1, 'a CoNLL-2003 line'),
    ('conllu', 'x-train.conllu', 'EU\tB-ORG\n', 1, 'a CoNLL-2003 line'),
])
def test_a_file_of_the_other_format_is_refused_naming_the_format_flag(
    tmp_path, fmt, name, text, line, message):
  path = _write(tmp_path, name, text)
  reader = tagging_data.read_conll2003 if fmt == 'conll2003' else tagging_data.read_conllu
  with pytest.raises(tagging_data.TaggingDataError) as e:
    reader(path)
  other = 'conllu' if fmt == 'conll2003' else 'conll2003'
  assert str(e.value).startswith(f'{path}:{line}: ') and message in str(e.value)
  assert f'data.format={fmt}' in str(e.value) and f'--format={other}' in str(e.value)
  assert '\n' not in str(e.value)


@pytest.mark.parametrize('fmt, text, column, line, message', [
    ('conll2003', 'EU NNP B-NP B-ORG\nrejects VBZ B-VP 17\n', -1, 2, "tag '17'"),
    ('conll2003', 'EU NNP _ B-ORG\n', 2, 1, "tag '_' (column 2, data.label_column) is an "
                                            'empty field'),
    ('conllu', _UD_LINES, 6, 3, "tag '0' (column 6, data.label_column) is a number"),
])
def test_a_tag_no_tag_set_uses_is_refused_naming_the_column(tmp_path, fmt, text, column,
                                                            line, message):
  path = _write(tmp_path, 'train.txt', text)
  reader = tagging_data.read_conll2003 if fmt == 'conll2003' else tagging_data.read_conllu
  with pytest.raises(tagging_data.TaggingDataError) as e:
    reader(path, column)
  assert str(e.value).startswith(f'{path}:{line}: {message}')


def test_a_conllu_column_left_empty_is_refused_and_real_tags_still_read(tmp_path):
  _write(tmp_path, 'x-train.conllu', _UD_LINES)
  with pytest.raises(tagging_data.TaggingDataError,
                     match=r"every tag in column 4 \(data.label_column\) is '_'"):
    tagging_data.load_split(str(tmp_path), 'conllu', 'train', label_column=4)
  # Column 7 (DEPREL) and 9 (MISC, '_' on one word only) are real tags.
  deprel = tagging_data.load_split(str(tmp_path), 'conllu', 'train', label_column=7)
  assert deprel.sentences[0].tags == ('root', 'obl')
  misc = tagging_data.load_split(str(tmp_path), 'conllu', 'train', label_column=9)
  assert misc.sentences[0].tags == ('_', 'SpaceAfter=No')
