"""GLUE metrics on hand-computed cases, degenerate ones included; the paper's average."""

import math

import numpy as np
import pytest

from eval.glue import metrics


def test_accuracy():
  assert metrics.accuracy([1, 0, 1, 1], [1, 1, 1, 0]) == 0.5
  assert metrics.accuracy(['entailment'], ['entailment']) == 1.0


@pytest.mark.parametrize('fn', [metrics.accuracy, metrics.f1, metrics.matthews_corrcoef,
                                metrics.pearson, metrics.spearman])
def test_bad_shapes_and_empty_inputs_raise(fn):
  with pytest.raises(ValueError, match='one length'):
    fn([1, 0], [1, 0, 1])
  with pytest.raises(ValueError, match='no examples'):
    fn([], [])


def test_f1_hand_computed():
  # tp = 2 (positions 0, 4), fp = 1 (1), fn = 1 (3): precision = recall = 2/3.
  assert metrics.f1([1, 1, 0, 0, 1], [1, 0, 0, 1, 1]) == pytest.approx(2 / 3)
  assert metrics.f1([1, 0, 1], [1, 0, 1]) == 1.0


def test_f1_single_predicted_class():
  # All negative: no true positives, so precision is 0/0 and F1 is 0 (scikit-learn's value).
  assert metrics.f1([0, 0, 0], [1, 0, 1]) == 0.0
  # No positives anywhere: also 0.
  assert metrics.f1([0, 0], [0, 0]) == 0.0
  # All positive: tp = 2, fp = 2, fn = 0: precision 1/2, recall 1, F1 2/3.
  assert metrics.f1([1, 1, 1, 1], [1, 0, 0, 1]) == pytest.approx(2 / 3)


def test_f1_rejects_non_binary_values():
  with pytest.raises(ValueError, match='0 or 1'):
    metrics.f1([0, 2], [0, 1])


def test_mcc_hand_computed_binary():
  # tp = 2, fp = 1, tn = 2, fn = 1: (2*2 - 1*1) / sqrt(3*3*3*3) = 1/3.
  assert metrics.matthews_corrcoef([1, 1, 0, 0, 1, 0], [1, 0, 0, 1, 1, 0]) == \
      pytest.approx(1 / 3)
  assert metrics.matthews_corrcoef([0, 1, 1, 0], [0, 1, 1, 0]) == pytest.approx(1.0)
  assert metrics.matthews_corrcoef([1, 0, 0, 1], [0, 1, 1, 0]) == pytest.approx(-1.0)


def test_mcc_single_predicted_or_true_class_is_zero():
  assert metrics.matthews_corrcoef([1, 1, 1, 1], [1, 0, 1, 0]) == 0.0
  assert metrics.matthews_corrcoef([0, 0, 0], [1, 0, 1]) == 0.0
  assert metrics.matthews_corrcoef([1, 0, 1], [1, 1, 1]) == 0.0


def test_mcc_multiclass_hand_computed():
  # n = 4, correct = 2, true counts (1, 2, 1), predicted (2, 1, 1):
  # (2*4 - 5) / sqrt((16 - 6) * (16 - 6)) = 3/10.
  assert metrics.matthews_corrcoef([0, 1, 2, 0], [0, 1, 1, 2]) == pytest.approx(0.3)


def test_mcc_matches_the_two_by_two_formula_on_random_data():
  rng = np.random.default_rng(0)
  labels = rng.integers(0, 2, 1000)
  preds = np.where(rng.random(1000) < 0.7, labels, 1 - labels)
  tp = np.sum((preds == 1) & (labels == 1))
  tn = np.sum((preds == 0) & (labels == 0))
  fp = np.sum((preds == 1) & (labels == 0))
  fn = np.sum((preds == 0) & (labels == 1))
  expected = (tp * tn - fp * fn) / math.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
  assert metrics.matthews_corrcoef(preds, labels) == pytest.approx(expected, abs=1e-12)


def test_pearson_hand_computed():
  # x - mean = (-1, 0, 1); y - mean = (-7, -1, 8)/6: r = (5/2) / sqrt(2 * 19/6).
  assert metrics.pearson([1, 2, 3], [1, 2, 3.5]) == pytest.approx(2.5 * math.sqrt(3 / 19))
  x = np.array([0.5, 4.0, 2.0, 3.25])
  assert metrics.pearson(x, 3 * x + 2) == pytest.approx(1.0)
  assert metrics.pearson(x, -x) == pytest.approx(-1.0)


def test_pearson_constant_input_is_zero():
  assert metrics.pearson([2.0, 2.0, 2.0], [1.0, 2.0, 3.0]) == 0.0
  assert metrics.pearson([1.0, 2.0, 3.0], [5.0, 5.0, 5.0]) == 0.0
  # The mean of three 0.1s is not exactly 0.1; the result must still be 0, not noise.
  assert np.mean([0.1, 0.1, 0.1]) != 0.1
  assert metrics.pearson([0.1, 0.1, 0.1], [1.0, 2.0, 3.0]) == 0.0


def test_pearson_and_spearman_reject_non_finite_values():
  with pytest.raises(ValueError, match='non-finite'):
    metrics.pearson([1.0, float('nan')], [1.0, 2.0])
  with pytest.raises(ValueError, match='non-finite'):
    metrics.spearman([1.0, 2.0], [1.0, float('inf')])


def test_rankdata_averages_ties():
  np.testing.assert_array_equal(metrics.rankdata([10, 20, 20, 20, 5]), [2, 4, 4, 4, 1])
  np.testing.assert_array_equal(metrics.rankdata([3.0, 1.0, 2.0]), [3, 1, 2])


def test_spearman_with_ties_uses_average_ranks():
  # Ranks (1, 2.5, 2.5, 4) and (1, 3, 2, 4): Pearson of them is sqrt(0.9). The textbook
  # no-ties shortcut 1 - 6 sum d^2 / (n (n^2 - 1)) would give 0.95 instead.
  assert metrics.spearman([1, 2, 2, 3], [1, 3, 2, 4]) == pytest.approx(math.sqrt(0.9))
  x = np.array([0.3, -2.0, 5.0, 1.0])
  assert metrics.spearman(x, x**3) == pytest.approx(1.0)
  assert metrics.spearman([1, 1, 1], [1, 2, 3]) == 0.0


def test_task_metrics_names_per_task():
  assert set(metrics.task_metrics('cola', [1, 0], [1, 0])) == {'mcc'}
  assert set(metrics.task_metrics('mrpc', [1, 0], [1, 0])) == {'accuracy', 'f1'}
  assert set(metrics.task_metrics('qqp', [1, 0], [1, 0])) == {'accuracy', 'f1'}
  assert set(metrics.task_metrics('stsb', [1.0, 2.0], [1.0, 2.5])) == {'pearson', 'spearman'}
  for name in ('sst2', 'mnli', 'mnli-m', 'mnli-mm', 'qnli', 'rte', 'wnli'):
    assert set(metrics.task_metrics(name, [1, 0], [1, 1])) == {'accuracy'}
  assert metrics.task_metrics('mrpc', [1, 1, 0, 0, 1], [1, 0, 0, 1, 1]) == \
      pytest.approx({'accuracy': 0.6, 'f1': 2 / 3})


def test_main_score_is_the_papers_choice():
  assert metrics.main_metric('cola') == 'mcc'
  assert metrics.main_metric('stsb') == 'pearson'
  assert metrics.main_metric('mrpc') == 'accuracy'
  assert metrics.main_metric('mnli-mm') == 'accuracy'
  assert metrics.main_score('stsb', {'pearson': 0.8, 'spearman': 0.7}) == 0.8
  with pytest.raises(ValueError, match="main score 'mcc'"):
    metrics.main_score('cola', {'accuracy': 0.5})


def test_unknown_task_lists_the_known_ones():
  with pytest.raises(ValueError, match='cola, sst2, mrpc'):
    metrics.task_metrics('sst-2', [1], [1])


def test_paper_average_reproduces_from_its_row():
  # (50.19 + (83.22 + 83.89)/2 + 87.24 + 91.71 + 90.12 + 64.84 + 93.17 + 86.81) / 8.
  average = metrics.glue_average(metrics.PAPER_RESULTS)
  assert average == pytest.approx(80.954375)
  assert round(average, 2) == metrics.PAPER_AVERAGE
  # Counting MNLI-m and -mm as two tasks would not: 731.19 / 9 = 81.24.
  assert round(sum(metrics.PAPER_RESULTS.values()) / 9, 2) == 81.24


def test_glue_average_leaves_out_wnli_and_needs_every_task():
  scores = dict(metrics.PAPER_RESULTS)
  assert metrics.glue_average(dict(scores, wnli=0.0)) == metrics.glue_average(scores)
  for key in metrics.PAPER_RESULTS:
    partial = {k: v for k, v in scores.items() if k != key}
    assert metrics.glue_average(partial) is None, key
  with pytest.raises(ValueError, match='unknown result keys'):
    metrics.glue_average({'sst-2': 0.9})


def test_format_table_beside_the_paper():
  results = {key: {metrics.main_metric(key): value / 100}
             for key, value in metrics.PAPER_RESULTS.items()}
  results['mrpc']['f1'] = 0.9
  results['stsb']['spearman'] = 0.85
  table = metrics.format_table(results)
  lines = table.splitlines()
  assert lines[0].split()[:2] == ['task', 'metric']
  assert lines[1].split() == ['CoLA', 'MCC', '50.19', '50.19']
  assert lines[4].split() == ['MRPC', 'accuracy', '87.24', '87.24', 'F1', '90.00']
  assert lines[9].split() == ['STS-B', 'Pearson', '86.81', '86.81', 'Spearman', '85.00']
  assert lines[10].split()[:4] == ['WNLI', 'accuracy', '-', '-']
  assert lines[11].split()[:3] == ['average', '80.95', '80.95']


def test_format_table_shows_tasks_not_run_as_dashes():
  lines = metrics.format_table({'sst2': {'accuracy': 0.5}}).splitlines()
  assert lines[8].split() == ['SST-2', 'accuracy', '50.00', '93.17']
  assert lines[1].split() == ['CoLA', 'MCC', '-', '50.19']
  assert lines[11].split()[:3] == ['average', '-', '80.95']
