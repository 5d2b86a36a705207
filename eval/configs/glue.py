"""GLUE fine-tuning configs: ``--config=eval/configs/glue.py[:preset]``.

Presets:
- ``paper`` (default): the paper's single-task fine-tuning (final version, Table 13):
  10 epochs, LAMB, linear warm-up over 200 steps, weight decay 0.01, and the grid batch
  size {16, 32, 64} x learning rate {1e-4, 5e-5, 2e-5, 1e-5} (``--sweep`` runs it,
  otherwise ``train.batch_size`` and ``optimizer.learning_rate`` are the one point run).
  Meant for the released model: ``--init_checkpoint=language_perceiver_io_bytes.pickle``.
- ``smoke``: a tiny model from scratch (or whatever ``--init_checkpoint`` holds), bytes
  cut at 256, at most 2,000 training examples per task, 2 epochs: ``--task=all`` over the
  six small tasks finishes in minutes on a laptop CPU. It checks the pipeline; its scores
  say nothing about Perceiver IO.

The model: with ``--init_checkpoint`` its stored config (``configs.language_mlm()`` for
DeepMind's pickle) and ``model`` here is ignored; without one, ``model`` is built from
scratch. Either way ``dropout`` below is applied to it.

Every field can be overridden from the command line, e.g.
``--config.optimizer.learning_rate=2e-5``; an unknown field is an error naming it.
Fields marked "chosen here" are not given by the paper.
"""

import ml_collections

from eval.configs import finetune
from perceiver import configs as model_configs


def _base() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.model = model_configs.language_mlm()   # the presets but ``paper`` set their own
  c.seed = 0   # parameter init of the new decoder/head, dropout, data order, train subset

  c.data = ml_collections.ConfigDict()
  # Bytes per example (a pair: a SEP b); longer examples are cut (the longer segment
  # first) and counted in the log and dev_metrics.json. 0: the model's max_seq_len.
  c.data.max_seq_len = 0
  # Chosen here: each split is padded to its longest encoded example rounded up to this
  # multiple (capped at max_seq_len), not to max_seq_len: GLUE examples are short, and
  # the train step and each split's predict step then compile once, for one shape.
  c.data.length_multiple = 32
  # Train on a seeded random subset of at most this many examples (0: all of them).
  c.data.max_train_examples = 0
  # Examples encoded at a time (MNLI/QQP are never held at max_seq_len all at once).
  c.data.encode_chunk = 8192

  c.dropout = ml_collections.ConfigDict()
  # Chosen here (Table 13 gives no dropout): BERT's fine-tuning value. ``encoder`` sets
  # the encoder's ``dropout_prob`` (used where the original uses it, in its attention
  # and MLP blocks); ``head`` the classification head's, on both of its inputs.
  c.dropout.encoder = 0.1
  c.dropout.head = 0.1

  # Paper: 10 epochs. Chosen here: 128 examples per predict call.
  finetune.add_blocks(c, epochs=10, eval_batch_size=128)

  c.sweep = ml_collections.ConfigDict()
  # --sweep: every (batch size, learning rate) pair, best dev main score per task (paper).
  c.sweep.batch_sizes = (16, 32, 64)
  c.sweep.learning_rates = (1e-4, 5e-5, 2e-5, 1e-5)
  return c


def paper() -> ml_collections.ConfigDict:
  return _base()   # the released model (configs.language_mlm())


def smoke() -> ml_collections.ConfigDict:
  c = _base()
  c.model = model_configs.tiny(max_seq_len=256)
  c.data.max_train_examples = 2000
  c.train.epochs = 2
  c.train.log_every = 20
  # A tiny model from scratch needs a far larger step than the pretrained model's grid.
  c.optimizer.learning_rate = 1e-3
  c.optimizer.warmup_steps = 20
  c.sweep.batch_sizes = (16, 32)
  c.sweep.learning_rates = (1e-3, 3e-4)
  return c


def cpu() -> ml_collections.ConfigDict:
  """The pretraining-helps-GLUE check on a CPU (README, train/LEARNING.md).

  The model of train/configs/mlm.py's ``cpu`` preset, so a run from scratch (no
  ``--init_checkpoint``) and one from that preset's checkpoint differ only in where the
  trunk starts. Both get the same budget: a seeded subset of the training set, a few
  epochs, one learning rate.
  """
  # Chosen here: a small model needs a larger step than the released model's grid; one
  # value for both runs (1e-3; 3e-4 and 3e-3 were worse for both at an earlier budget:
  # README, GLUE section).
  c = finetune.cpu_model(_base(), learning_rate=1e-3)
  # Chosen here: one pass over all 67,349 SST-2 sentences (about 1.5 minutes on two
  # cores). One epoch leaves no best-epoch choice on dev; and with 8,000 sentences x 3
  # epochs the gap was smaller and varied more with the seed (README, GLUE section).
  c.data.max_train_examples = 0
  c.train.epochs = 1
  c.train.log_every = 50
  return c


PRESETS = {'paper': paper, 'smoke': smoke, 'cpu': cpu}


def get_config(preset: str = 'paper') -> ml_collections.ConfigDict:
  return model_configs.from_presets(PRESETS, preset or 'paper',
                                    'unknown preset {name!r} for eval/configs/glue.py')
