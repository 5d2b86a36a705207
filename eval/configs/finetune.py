"""The blocks every fine-tuning config holds (``eval/configs/glue.py``,
``eval/configs/tagging.py``): the optimizer, the device mesh, the training loop and the
predict batch, as both commands start from them. ``add_blocks`` puts them in a config;
each config then sets what is its own. ``cpu_model``: the small model of the presets
that run on a CPU. Fields marked "chosen here" are not given by the
paper; "paper" values are its GLUE fine-tuning's (final version, Table 13), which the
tagger takes too (the paper has no tagging experiment).
"""

import ml_collections

from perceiver import configs as model_configs


def add_blocks(c: ml_collections.ConfigDict, *, epochs: int,
               eval_batch_size: int) -> ml_collections.ConfigDict:
  """``c`` with ``optimizer``, ``mesh``, ``train`` (``epochs`` of them) and ``eval`` (its
  ``batch_size``: rows per predict call)."""
  c.optimizer = ml_collections.ConfigDict()
  c.optimizer.name = 'lamb'            # paper
  # Chosen here: the middle of the paper's GLUE grid; BERT's NER value.
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
  c.train.epochs = epochs
  # Global batch = per-device batch x devices x grad_accum_steps. 32: one point of the
  # paper's grid {16, 32, 64}, and BERT's NER value; chosen here. An epoch is
  # ceil(examples / batch_size) steps; its last batch is filled with zero-weight padding
  # rows (no example dropped).
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
  # Rows per predict call (rounded up to a multiple of the device count); the last batch
  # is padded, so each split's predict step compiles once.
  c.eval.batch_size = eval_batch_size
  return c


def cpu_model(c: ml_collections.ConfigDict, *,
              learning_rate: float) -> ml_collections.ConfigDict:
  """``c`` with the model of train/configs/mlm.py's ``smoke`` and ``cpu`` presets (their
  sinusoid position tables: same names and shapes, so their checkpoints fit it), trained
  at ``learning_rate`` (a small model needs a larger step than the released model's)
  after 50 warm-up steps, without dropout (a small model and a short budget); chosen
  here."""
  c.model = model_configs.with_position_init(model_configs.cpu_sized(64), 'sinusoid', 1.0)
  c.optimizer.learning_rate = learning_rate
  c.optimizer.warmup_steps = 50
  c.dropout.encoder = 0.0
  c.dropout.head = 0.0
  return c
