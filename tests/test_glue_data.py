"""GLUE readers and encoding on generated files in each task's official layout, then the
real files (../shared/data/glue, or $PERCEIVER_GLUE_DIR)."""

import logging

import numpy as np
import pytest

from eval.glue import data as glue_data
from perceiver.model import tokenizer as tok_lib
from tests import helpers

TOK = tok_lib.BytesTokenizer()

_MNLI_TEST = ('index\tpromptID\tpairID\tgenre\tsentence1_binary_parse\tsentence2_binary_parse'
              '\tsentence1_parse\tsentence2_parse\tsentence1\tsentence2')
_STSB_TEST = ('index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1'
              '\tsentence2')
# The official layouts, written out here independently of eval.glue.data: per task its
# folder, text columns, label column, labels, and per split (file, header, has_header).
OFFICIAL = {
    'cola': ('CoLA', 'sentence', None, 'label', ('0', '1'), {
        'train': ('train.tsv', 'source\tlabel\toriginal_label\tsentence', False),
        'dev': ('dev.tsv', 'source\tlabel\toriginal_label\tsentence', False),
        'test': ('test.tsv', 'index\tsentence', True)}),
    'sst2': ('SST-2', 'sentence', None, 'label', ('0', '1'), {
        'train': ('train.tsv', 'sentence\tlabel', True),
        'dev': ('dev.tsv', 'sentence\tlabel', True),
        'test': ('test.tsv', 'index\tsentence', True)}),
    'mrpc': ('MRPC', '#1 String', '#2 String', 'Quality', ('0', '1'), {
        'train': ('train.tsv', 'Quality\t#1 ID\t#2 ID\t#1 String\t#2 String', True),
        'dev': ('dev.tsv', 'Quality\t#1 ID\t#2 ID\t#1 String\t#2 String', True),
        'test': ('test.tsv', 'index\t#1 ID\t#2 ID\t#1 String\t#2 String', True)}),
    'stsb': ('STS-B', 'sentence1', 'sentence2', 'score', None, {
        'train': ('train.tsv', _STSB_TEST + '\tscore', True),
        'dev': ('dev.tsv', _STSB_TEST + '\tscore', True),
        'test': ('test.tsv', _STSB_TEST, True)}),
    'qqp': ('QQP', 'question1', 'question2', 'is_duplicate', ('0', '1'), {
        'train': ('train.tsv', 'id\tqid1\tqid2\tquestion1\tquestion2\tis_duplicate', True),
        'dev': ('dev.tsv', 'id\tqid1\tqid2\tquestion1\tquestion2\tis_duplicate', True),
        'test': ('test.tsv', 'id\tquestion1\tquestion2', True)}),
    'mnli': ('MNLI', 'sentence1', 'sentence2', 'gold_label',
             ('contradiction', 'entailment', 'neutral'), {
                 'train': ('train.tsv', _MNLI_TEST + '\tlabel1\tgold_label', True),
                 'dev_matched': ('dev_matched.tsv', _MNLI_TEST +
                                 '\tlabel1\tlabel2\tlabel3\tlabel4\tlabel5\tgold_label', True),
                 'dev_mismatched': ('dev_mismatched.tsv', _MNLI_TEST +
                                    '\tlabel1\tlabel2\tlabel3\tlabel4\tlabel5\tgold_label',
                                    True),
                 'test_matched': ('test_matched.tsv', _MNLI_TEST, True),
                 'test_mismatched': ('test_mismatched.tsv', _MNLI_TEST, True),
                 'diagnostic': ('../diagnostic/diagnostic.tsv', 'index\tsentence1\tsentence2',
                                True)}),
    'qnli': ('QNLI', 'question', 'sentence', 'label', ('entailment', 'not_entailment'), {
        'train': ('train.tsv', 'index\tquestion\tsentence\tlabel', True),
        'dev': ('dev.tsv', 'index\tquestion\tsentence\tlabel', True),
        'test': ('test.tsv', 'index\tquestion\tsentence', True)}),
    'rte': ('RTE', 'sentence1', 'sentence2', 'label', ('entailment', 'not_entailment'), {
        'train': ('train.tsv', 'index\tsentence1\tsentence2\tlabel', True),
        'dev': ('dev.tsv', 'index\tsentence1\tsentence2\tlabel', True),
        'test': ('test.tsv', 'index\tsentence1\tsentence2', True)}),
    'wnli': ('WNLI', 'sentence1', 'sentence2', 'label', ('0', '1'), {
        'train': ('train.tsv', 'index\tsentence1\tsentence2\tlabel', True),
        'dev': ('dev.tsv', 'index\tsentence1\tsentence2\tlabel', True),
        'test': ('test.tsv', 'index\tsentence1\tsentence2', True)}),
}
NUM_ROWS = 5


def _cell(column, row, label_column, labels):
  if column == label_column:
    return f'{row * 1.25:.3f}' if labels is None else labels[row % len(labels)]
  if column in ('index', 'id'):
    return str(100 + row)
  return f'{column} {row}'


def _write(path, lines, *, bom=False, newline='\n', final_newline=True):
  path.parent.mkdir(parents=True, exist_ok=True)
  text = newline.join(lines) + (newline if final_newline else '')
  path.write_bytes((b'\xef\xbb\xbf' if bom else b'') + text.encode('utf-8'))
  return path


def _make_glue(root, tasks=tuple(OFFICIAL)):
  """A GLUE directory with NUM_ROWS rows in every split of ``tasks``."""
  for name in tasks:
    directory, _, _, label_column, labels, files = OFFICIAL[name]
    for file, header, has_header in files.values():
      columns = header.split('\t')
      rows = ['\t'.join(_cell(c, i, label_column, labels) for c in columns)
              for i in range(NUM_ROWS)]
      _write(root / directory / file, ([header] if has_header else []) + rows)
  return root


@pytest.fixture(scope='module')
def glue(tmp_path_factory):
  return _make_glue(tmp_path_factory.mktemp('glue'))


SPLITS = [(name, split) for name, spec in OFFICIAL.items() for split in spec[5]]


@pytest.mark.parametrize('name,split', SPLITS)
def test_every_split_of_every_task_reads_its_official_layout(glue, name, split):
  _, text_a, text_b, label_column, labels, files = OFFICIAL[name]
  header = files[split][1].split('\t')
  result = glue_data.load_split(glue, name, split)
  assert result.skipped == []
  assert len(result.examples) == NUM_ROWS
  has_index = 'index' in header or 'id' in header
  for i, example in enumerate(result.examples):
    assert example.index == (str(100 + i) if has_index else str(i))
    assert example.text_a == f'{text_a} {i}'
    assert example.text_b == (None if text_b is None else f'{text_b} {i}')
    if label_column not in header:
      assert example.label is None
    elif labels is None:
      assert example.label == i * 1.25
    else:
      assert example.label == labels[i % len(labels)]


def test_a_row_count_unlike_the_official_files_is_logged(glue, caplog):
  with caplog.at_level(logging.WARNING):
    result = glue_data.load_split(glue, 'sst2', 'dev')
  assert result.summary().endswith('SST-2/dev.tsv: 5 examples (the official file has 872), '
                                   '0 rows skipped')
  assert '(the official file has 872)' in caplog.text


def test_tasks_labels_outputs_and_submission_files():
  assert tuple(glue_data.TASKS) == ('cola', 'sst2', 'mrpc', 'stsb', 'qqp', 'mnli', 'qnli',
                                    'rte', 'wnli')
  for name, task in glue_data.TASKS.items():
    assert task.directory == OFFICIAL[name][0]
    assert set(task.labels) == set(OFFICIAL[name][4] or ())
    assert {s.name for s in task.splits} == set(OFFICIAL[name][5])
  assert glue_data.TASKS['mnli'].labels == ('contradiction', 'entailment', 'neutral')
  assert [t.num_outputs for t in glue_data.TASKS.values()] == [2, 2, 2, 1, 2, 3, 2, 2, 2]
  assert [n for n, t in glue_data.TASKS.items() if t.is_regression] == ['stsb']
  assert {n: t.submission_files for n, t in glue_data.TASKS.items()} == {
      'cola': ('CoLA.tsv',), 'sst2': ('SST-2.tsv',), 'mrpc': ('MRPC.tsv',),
      'stsb': ('STS-B.tsv',), 'qqp': ('QQP.tsv',), 'mnli': ('MNLI-m.tsv', 'MNLI-mm.tsv'),
      'qnli': ('QNLI.tsv',), 'rte': ('RTE.tsv',), 'wnli': ('WNLI.tsv',)}
  mnli = glue_data.TASKS['mnli']
  assert mnli.layout('diagnostic').submission == 'AX.tsv'
  assert mnli.dev_splits == ('dev_matched', 'dev_mismatched')
  assert [mnli.result_key(s) for s in mnli.dev_splits] == ['mnli-m', 'mnli-mm']
  assert glue_data.TASKS['sst2'].result_key('dev') == 'sst2'
  assert glue_data.TASKS['cola'].main_metric == 'mcc'
  assert glue_data.TASKS['stsb'].main_metric == 'pearson'


def test_unknown_task_and_split_list_the_known_ones(glue):
  with pytest.raises(glue_data.GlueDataError, match='known tasks: cola, sst2, mrpc, stsb'):
    glue_data.load_split(glue, 'sst-2', 'dev')
  with pytest.raises(glue_data.GlueDataError, match='known: train, dev_matched'):
    glue_data.load_split(glue, 'mnli', 'dev')


def test_missing_directory_folder_and_file(tmp_path):
  with pytest.raises(glue_data.GlueDataError, match='GLUE directory .*nowhere not found'):
    glue_data.load_split(tmp_path / 'nowhere', 'rte', 'dev')
  _make_glue(tmp_path, tasks=('rte', 'mnli'))
  with pytest.raises(glue_data.GlueDataError,
                     match=r'folder .*QNLI not found; the official layout has QNLI/train\.tsv'):
    glue_data.load_split(tmp_path, 'qnli', 'train')
  (tmp_path / 'MNLI' / 'dev_mismatched.tsv').unlink()
  with pytest.raises(glue_data.GlueDataError,
                     match=r'file .*dev_mismatched\.tsv not found.*MNLI/dev_matched\.tsv'):
    glue_data.load_split(tmp_path, 'mnli', 'dev_mismatched')


def test_byte_order_mark_crlf_and_no_final_newline(tmp_path):
  header = 'Quality\t#1 ID\t#2 ID\t#1 String\t#2 String'
  _write(tmp_path / 'MRPC' / 'dev.tsv', [header, '1\t7\t8\tA "quoted\tB'], bom=True)
  _write(tmp_path / 'CoLA' / 'dev.tsv', ['gj04\t1\t\tFirst.', 'gj04\t0\t*\tLast one.'],
         bom=True, newline='\r\n', final_newline=False)
  [example] = glue_data.load_split(tmp_path, 'mrpc', 'dev').examples
  assert example == glue_data.Example('0', 'A "quoted', 'B', '1')
  examples = glue_data.load_split(tmp_path, 'cola', 'dev').examples
  assert [(e.text_a, e.label) for e in examples] == [('First.', '1'), ('Last one.', '0')]


def test_no_quote_processing_and_only_tabs_split(tmp_path):
  fields = ['0', '"He said, "no\u2028way', 'it\x0bis " odd"', 'entailment']
  _write(tmp_path / 'RTE' / 'train.tsv', ['index\tsentence1\tsentence2\tlabel',
                                          '\t'.join(fields)])
  [example] = glue_data.load_split(tmp_path, 'rte', 'train').examples
  assert (example.text_a, example.text_b) == tuple(fields[1:3])


def test_wrong_column_count_names_file_and_line(tmp_path):
  _write(tmp_path / 'RTE' / 'dev.tsv', ['index\tsentence1\tsentence2\tlabel',
                                        '0\ta\tb\tentailment', '1\ta b\tentailment'])
  with pytest.raises(glue_data.GlueDataError,
                     match=r'RTE/dev\.tsv:3: 3 columns, expected 4 \(index, sentence1'):
    glue_data.load_split(tmp_path, 'rte', 'dev')


def test_wrong_header_and_empty_file(tmp_path):
  _write(tmp_path / 'SST-2' / 'dev.tsv', ['text\tlabel', 'good\t1'])
  with pytest.raises(glue_data.GlueDataError,
                     match=r"SST-2/dev\.tsv:1: header .* not the official \['sentence', 'label'\]"):
    glue_data.load_split(tmp_path, 'sst2', 'dev')
  (tmp_path / 'SST-2' / 'dev.tsv').write_bytes(b'')
  with pytest.raises(glue_data.GlueDataError, match=r'dev\.tsv: empty file'):
    glue_data.load_split(tmp_path, 'sst2', 'dev')


def test_unknown_label_names_file_line_and_known_labels(tmp_path):
  _make_glue(tmp_path, tasks=('mnli', 'cola'))
  path = tmp_path / 'MNLI' / 'dev_matched.tsv'
  lines = path.read_text().splitlines()
  fields = lines[2].split('\t')
  lines[2] = '\t'.join(fields[:-1] + ['-'])  # MNLI's "no gold label" marker
  _write(path, lines)
  with pytest.raises(glue_data.GlueDataError, match=r"dev_matched\.tsv:3: unknown label '-'; "
                     'known labels: contradiction, entailment, neutral'):
    glue_data.load_split(tmp_path, 'mnli', 'dev_matched')
  # A stray header in CoLA's header-less train file is an unknown label on line 1.
  path = tmp_path / 'CoLA' / 'train.tsv'
  _write(path, ['source\tlabel\toriginal_label\tsentence'] + path.read_text().splitlines())
  with pytest.raises(glue_data.GlueDataError, match=r"train\.tsv:1: unknown label 'label'"):
    glue_data.load_split(tmp_path, 'cola', 'train')


@pytest.mark.parametrize('score', ['abc', 'nan', ''])
def test_stsb_score_must_be_a_finite_number(tmp_path, score):
  header = _STSB_TEST + '\tscore'
  row = '0\tg\tf\t2012\t0001\tnone\tnone\tA.\tB.\t' + score
  _write(tmp_path / 'STS-B' / 'dev.tsv', [header, row])
  with pytest.raises(glue_data.GlueDataError, match=r'dev\.tsv:2: score .* not a finite'):
    glue_data.load_split(tmp_path, 'stsb', 'dev')


def test_not_utf8_names_the_line(tmp_path):
  path = _write(tmp_path / 'WNLI' / 'dev.tsv', ['index\tsentence1\tsentence2\tlabel',
                                                '0\ta\tb\t1'])
  path.write_bytes(path.read_bytes() + b'1\t\xff\tb\t0\n')
  with pytest.raises(glue_data.GlueDataError, match=r'WNLI/dev\.tsv:3: not UTF-8'):
    glue_data.load_split(tmp_path, 'wnli', 'dev')


def test_qqp_malformed_rows_are_skipped_and_reported(tmp_path, caplog):
  # Upstream, a question with a line break spans two lines: 4 fields, then 3.
  _write(tmp_path / 'QQP' / 'train.tsv', [
      'id\tqid1\tqid2\tquestion1\tquestion2\tis_duplicate',
      '1\t11\t12\tHow?\tWhy?\t0',
      '2\t21\t22\t"Was it',
      '"\tWas it real?\t0',
      '3\t31\t32\tWhat?\t\t1',  # an empty question is a well-formed row
  ])
  with caplog.at_level(logging.WARNING):
    result = glue_data.load_split(tmp_path, 'qqp', 'train')
  assert [e.index for e in result.examples] == ['1', '3']
  assert result.examples[1].text_b == ''
  assert result.skipped == [(3, '4 columns, expected 6'), (4, '3 columns, expected 6')]
  assert result.summary().endswith('QQP/train.tsv: 2 examples (the official file has '
                                    '363846), 2 rows skipped (lines 3, 4)')
  assert '2 rows skipped (lines 3, 4); first: 4 columns, expected 6' in caplog.text
  # Labels stay strict in QQP too.
  _write(tmp_path / 'QQP' / 'dev.tsv', ['id\tqid1\tqid2\tquestion1\tquestion2\tis_duplicate',
                                        '1\t11\t12\tHow?\tWhy?\tyes'])
  with pytest.raises(glue_data.GlueDataError, match=r"dev\.tsv:2: unknown label 'yes'"):
    glue_data.load_split(tmp_path, 'qqp', 'dev')


def test_encode_single_sentences_without_cls(glue):
  examples = glue_data.load_split(glue, 'cola', 'dev').examples
  encoded = glue_data.encode(examples, 'cola', max_seq_len=16, tokenizer=TOK)
  assert encoded.input_ids.shape == encoded.input_mask.shape == (NUM_ROWS, 16)
  assert encoded.input_ids.dtype == np.int32
  np.testing.assert_array_equal(encoded.input_ids[0, :10], TOK.to_int('sentence 0'))
  np.testing.assert_array_equal(encoded.input_mask[0], [1] * 10 + [0] * 6)
  assert TOK.cls_token not in encoded.input_ids
  assert encoded.labels.dtype == np.int32
  np.testing.assert_array_equal(encoded.labels, [0, 1, 0, 1, 0])
  assert encoded.num_truncated == 0


def test_encode_pairs_with_sep_and_label_ids(glue):
  examples = glue_data.load_split(glue, 'mnli', 'dev_matched').examples
  encoded = glue_data.encode(examples, glue_data.TASKS['mnli'], max_seq_len=32)
  expected = np.concatenate([TOK.to_int('sentence1 0'), [TOK.sep_token],
                             TOK.to_int('sentence2 0')])
  np.testing.assert_array_equal(encoded.input_ids[0, :len(expected)], expected)
  assert encoded.input_mask[0].sum() == len(expected)
  # Labels cycle contradiction, entailment, neutral: ids in that order.
  np.testing.assert_array_equal(encoded.labels, [0, 1, 2, 0, 1])


def test_encode_counts_truncation_and_stsb_floats(glue):
  examples = glue_data.load_split(glue, 'stsb', 'train').examples
  encoded = glue_data.encode(examples, 'stsb', max_seq_len=12)
  assert encoded.num_truncated == NUM_ROWS  # 'sentence1 0' SEP 'sentence2 0' is 23 bytes
  assert encoded.labels.dtype == np.float32
  np.testing.assert_array_equal(encoded.labels, [0.0, 1.25, 2.5, 3.75, 5.0])
  assert glue_data.encode(examples, 'stsb', max_seq_len=23).num_truncated == 0


def test_encode_test_split_has_no_labels_and_mixed_is_an_error(glue):
  test = glue_data.load_split(glue, 'rte', 'test').examples
  assert glue_data.encode(test, 'rte', 64).labels is None
  dev = glue_data.load_split(glue, 'rte', 'dev').examples
  with pytest.raises(glue_data.GlueDataError, match='1 of 6 examples have no label'):
    glue_data.encode(dev + test[:1], 'rte', 64)
  with pytest.raises(glue_data.GlueDataError, match='two segments'):
    glue_data.encode([glue_data.Example('0', 'a', None, 'entailment')], 'rte', 64)
  with pytest.raises(glue_data.GlueDataError, match="unknown labels \\['2'\\]"):
    glue_data.label_ids('sst2', ['0', '2'])


# The official row counts of the real files (header lines excluded).
REAL_COUNTS = {
    'cola': {'train': 8551, 'dev': 1043, 'test': 1063},
    'sst2': {'train': 67349, 'dev': 872, 'test': 1821},
    'mrpc': {'train': 3668, 'dev': 408, 'test': 1725},
    'rte': {'train': 2490, 'dev': 277, 'test': 3000},
    'stsb': {'train': 5749, 'dev': 1500, 'test': 1379},
    'wnli': {'train': 635, 'dev': 71, 'test': 146},
    # Not in ../shared.
    'mnli': {'train': 392702, 'dev_matched': 9815, 'dev_mismatched': 9832,
             'test_matched': 9796, 'test_mismatched': 9847, 'diagnostic': 1104},
    'qqp': {'train': 363846, 'dev': 40430, 'test': 390965},
    'qnli': {'train': 104743, 'dev': 5463, 'test': 5463},
}


def test_every_split_knows_its_official_row_count():
  # Load summaries compare against these; MNLI, QQP and QNLI are not in ../shared, so their
  # counts are checked here only.
  assert sorted(REAL_COUNTS) == sorted(glue_data.TASKS)
  for name, counts in REAL_COUNTS.items():
    task = glue_data.TASKS[name]
    assert {split.name: split.official_rows for split in task.splits} == counts


@pytest.mark.parametrize('name', ['cola', 'sst2', 'mrpc', 'rte', 'stsb', 'wnli'])
def test_real_glue_files_have_the_official_row_counts(name):
  root = helpers.glue_dir()
  task = glue_data.TASKS[name]
  for split, count in REAL_COUNTS[name].items():
    result = glue_data.load_split(root, name, split)
    assert task.layout(split).official_rows == count
    assert (len(result.examples), len(result.skipped)) == (count, 0), result.summary()
    assert result.summary() == f'{result.path}: {count} examples, 0 rows skipped'
    labels = {e.label for e in result.examples}
    if split.startswith('test') or split == 'diagnostic':
      assert labels == {None}
    elif task.is_regression:
      assert min(labels) == 0.0 and max(labels) == 5.0
    else:
      assert labels == set(task.labels)


def test_real_files_quirks():
  root = helpers.glue_dir()
  # MRPC train starts with a BOM; its header still matches and the first row is intact.
  assert (root / 'MRPC' / 'train.tsv').read_bytes()[:3] == b'\xef\xbb\xbf'
  first = glue_data.load_split(root, 'mrpc', 'train').examples[0]
  assert first.label == '1' and first.text_a.startswith('Amrozi accused his brother')
  # CoLA dev has no final newline: the last row is whole.
  assert (root / 'CoLA' / 'dev.tsv').read_bytes()[-1:] != b'\n'
  assert glue_data.load_split(root, 'cola', 'dev').examples[-1].text_a == \
      'John talked to Bill about himself.'
  # Stray quotes stay in the text (no quote processing).
  rte = glue_data.load_split(root, 'rte', 'train').examples
  assert any(e.text_a.count('"') % 2 for e in rte)
  # The test files' indices run 0..n-1, which the submission files repeat.
  test = glue_data.load_split(root, 'sst2', 'test').examples
  assert [e.index for e in test] == [str(i) for i in range(len(test))]
