"""GLUE submission files, dev predictions and JSON: formats, checks, atomic writes."""

import json
import os

import numpy as np
import pytest

from eval.glue import data as glue_data
from eval.glue import outputs as glue_outputs
from perceiver.command import atomic


def _read(path):
  with open(path, encoding='utf-8', newline='') as f:
    return f.read()


# Task, split, label ids, the file the GLUE server expects and the label strings in it.
SUBMISSIONS = [
    ('cola', 'test', [1, 0], 'CoLA.tsv', ['1', '0']),
    ('sst2', 'test', [0, 1], 'SST-2.tsv', ['0', '1']),
    ('mrpc', 'test', [1, 1], 'MRPC.tsv', ['1', '1']),
    ('qqp', 'test', [0, 1], 'QQP.tsv', ['0', '1']),
    ('mnli', 'test_matched', [0, 2], 'MNLI-m.tsv', ['contradiction', 'neutral']),
    ('mnli', 'test_mismatched', [1, 0], 'MNLI-mm.tsv', ['entailment', 'contradiction']),
    ('mnli', 'diagnostic', [2, 1], 'AX.tsv', ['neutral', 'entailment']),
    ('qnli', 'test', [1, 0], 'QNLI.tsv', ['not_entailment', 'entailment']),
    ('rte', 'test', [0, 1], 'RTE.tsv', ['entailment', 'not_entailment']),
    ('wnli', 'test', [1, 0], 'WNLI.tsv', ['1', '0']),
]


@pytest.mark.parametrize('task,split,ids,file,strings', SUBMISSIONS)
def test_submission_files_use_the_servers_names_and_label_strings(tmp_path, task, split,
                                                                  ids, file, strings):
  path = glue_outputs.write_submission(tmp_path, task, split, ['0', '1'], np.array(ids))
  assert path == os.path.join(str(tmp_path), file)
  assert _read(path) == f'index\tprediction\n0\t{strings[0]}\n1\t{strings[1]}\n'


def test_stsb_submission_has_three_decimals(tmp_path):
  path = glue_outputs.write_submission(tmp_path, 'stsb', 'test', [0, 1, 2],
                                  np.array([4.56789, 0.0, 5.2], np.float32))
  assert _read(path) == 'index\tprediction\n0\t4.568\n1\t0.000\n2\t5.200\n'


def test_every_test_split_has_a_submission_file(tmp_path):
  names = []
  for task in glue_data.TASKS.values():
    for split in task.test_splits:
      preds = np.zeros(2, np.float32 if task.is_regression else np.int64)
      names.append(os.path.basename(glue_outputs.write_submission(tmp_path, task, split,
                                                             ['0', '1'], preds)))
  assert sorted(names) == sorted(os.listdir(tmp_path)) == sorted([
      'CoLA.tsv', 'SST-2.tsv', 'MRPC.tsv', 'STS-B.tsv', 'QQP.tsv', 'MNLI-m.tsv',
      'MNLI-mm.tsv', 'QNLI.tsv', 'RTE.tsv', 'WNLI.tsv'])


def test_submission_rejects_bad_input(tmp_path):
  with pytest.raises(glue_data.GlueDataError, match="'dev' has no submission file"):
    glue_outputs.write_submission(tmp_path, 'rte', 'dev', ['0'], [0])
  with pytest.raises(ValueError, match=r'label ids in \[0, 3\)'):
    glue_outputs.write_submission(tmp_path, 'mnli', 'test_matched', ['0'], [3])
  with pytest.raises(ValueError, match='label ids'):
    glue_outputs.write_submission(tmp_path, 'rte', 'test', ['0'], [0.7])
  with pytest.raises(ValueError, match='2 indices but 1 predictions'):
    glue_outputs.write_submission(tmp_path, 'rte', 'test', ['0', '1'], [0])
  with pytest.raises(ValueError, match='indices repeat'):
    glue_outputs.write_submission(tmp_path, 'rte', 'test', ['0', '0'], [0, 1])
  with pytest.raises(ValueError, match='1 predictions are not finite'):
    glue_outputs.write_submission(tmp_path, 'stsb', 'test', ['0', '1'], [1.0, np.nan])
  with pytest.raises(glue_data.GlueDataError, match='known tasks'):
    glue_outputs.write_submission(tmp_path, 'sts-b', 'test', ['0'], [1.0])
  assert os.listdir(tmp_path) == []


def test_dev_predictions_with_labels(tmp_path):
  path = glue_outputs.write_dev_predictions(tmp_path / 'rte' / 'dev_predictions.tsv', 'rte',
                                       ['3', '7'], [0, 1], [1, 1])
  assert _read(path) == ('index\tprediction\tlabel\n3\tentailment\tnot_entailment\n'
                         '7\tnot_entailment\tnot_entailment\n')
  path = glue_outputs.write_dev_predictions(tmp_path / 'stsb.tsv', 'stsb', ['0'], [2.25], [3.0])
  assert _read(path) == 'index\tprediction\tlabel\n0\t2.250\t3.000\n'
  with pytest.raises(ValueError, match='2 predictions but 1 labels'):
    glue_outputs.write_dev_predictions(tmp_path / 'x.tsv', 'rte', ['0', '1'], [0, 1], [0])


def test_json_round_trip_and_nan_is_refused(tmp_path):
  path = tmp_path / 'sst2' / 'dev_metrics.json'
  atomic.write_json(path, {'accuracy': 0.5, 'num_truncated': 0})
  assert json.loads(_read(path)) == {'accuracy': 0.5, 'num_truncated': 0}
  with pytest.raises(ValueError):
    atomic.write_json(path, {'pearson': float('nan')})
  assert json.loads(_read(path)) == {'accuracy': 0.5, 'num_truncated': 0}


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path, monkeypatch):
  path = glue_outputs.write_submission(tmp_path, 'sst2', 'test', ['0'], [1])
  before = _read(path)

  def fail(src, dst):
    raise OSError('disk full')

  monkeypatch.setattr(os, 'replace', fail)
  with pytest.raises(OSError, match='disk full'):
    glue_outputs.write_submission(tmp_path, 'sst2', 'test', ['0'], [0])
  assert _read(path) == before
  assert os.listdir(tmp_path) == ['SST-2.tsv']
