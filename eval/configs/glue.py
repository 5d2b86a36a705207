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

from perceiver import configs as model_configs


def _base() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
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

  c.optimizer = ml_collections.ConfigDict()
  c.optimizer.name = 'lamb'            # paper, Table 13
  # One point of the grid, chosen here: its middle (the paper reports the best per task).
  c.optimizer.learning_rate = 5e-5
  c.optimizer.warmup_steps = 200       # paper: linear warm-up over 200 steps
  # Chosen here: linear decay to 0 at the end of the run (BERT's fine-tuning schedule).
  c.optimizer.decay = 'linear'
  c.optimizer.decay_steps = 0          # 0: the run's total number of steps
  c.optimizer.weight_decay = 0.01      # paper; not on biases or norms (train/optim.py)
  c.optimizer.b1 = 0.9                 # chosen here (optax / BERT-LAMB defaults)
  c.optimizer.b2 = 0.999
  c.optimizer.eps = 1e-6
  c.optimizer.clip_grad_norm = 1.0     # chosen here; <= 0 disables

  # The device mesh the steps are jitted over (perceiver.training.mesh; -1: every device
  # the other axis leaves). Chosen here: data parallel over this host's devices; fsdp > 1
  # splits the parameters and optimizer state over that many devices.
  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = -1
  c.mesh.fsdp = 1

  c.train = ml_collections.ConfigDict()
  c.train.epochs = 10                  # paper
  # Global batch = per-device batch x devices x grad_accum_steps. 32: one point of the
  # paper's grid {16, 32, 64}, chosen here. An epoch is ceil(examples / batch_size)
  # steps; its last batch is filled with zero-weight padding rows (no example dropped).
  c.train.batch_size = 32
  c.train.grad_accum_steps = 1
  c.train.log_every = 50               # steps between progress lines (with ETA)
  # Steps between resume checkpoints (0: at the end of every epoch), chosen here: a run
  # killed mid-way continues from the last one when the command is run again.
  c.train.checkpoint_every = 0
  # Chosen here: after SIGTERM/SIGINT, the seconds allowed to save and stop; past them
  # the process exits with status 3 instead of hanging.
  c.train.stop_timeout_s = 300.0

  c.eval = ml_collections.ConfigDict()
  # Dev/test examples per predict call (rounded up to a multiple of the device count);
  # the last batch is padded, so each split's predict step compiles once.
  c.eval.batch_size = 128

  c.sweep = ml_collections.ConfigDict()
  # --sweep: every (batch size, learning rate) pair, best dev main score per task (paper).
  c.sweep.batch_sizes = (16, 32, 64)
  c.sweep.learning_rates = (1e-4, 5e-5, 2e-5, 1e-5)
  return c


def paper() -> ml_collections.ConfigDict:
  c = _base()
  c.model = model_configs.language_mlm()
  return c


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
  c = _base()
  c.model = model_configs.with_position_init(model_configs.cpu_sized(64), 'sinusoid', 1.0)
  # Chosen here: one pass over all 67,349 SST-2 sentences (about 1.5 minutes on two
  # cores). One epoch leaves no best-epoch choice on dev; and with 8,000 sentences x 3
  # epochs the gap was smaller and varied more with the seed (README, GLUE section).
  c.data.max_train_examples = 0
  c.train.epochs = 1
  c.train.log_every = 50
  # Chosen here: a small model needs a larger step than the released model's grid; one
  # value for both runs (1e-3; 3e-4 and 3e-3 were worse for both at an earlier budget:
  # README, GLUE section).
  c.optimizer.learning_rate = 1e-3
  c.optimizer.warmup_steps = 50
  # No dropout: the models are small and the budget short (chosen here).
  c.dropout.encoder = 0.0
  c.dropout.head = 0.0
  return c


PRESETS = {'paper': paper, 'smoke': smoke, 'cpu': cpu}


def get_config(preset: str = 'paper') -> ml_collections.ConfigDict:
  return model_configs.from_presets(PRESETS, preset or 'paper',
                                    'unknown preset {name!r} for eval/configs/glue.py')
