"""MLM pretraining configs: ``--config=train/configs/mlm.py[:preset]``.

Presets:
- ``smoke`` (default): a small model on the built-in corpus (the Python standard
  library's docstrings, no download); about a minute on a laptop CPU, and it learns to
  use context (held-out accuracy above the context-free baseline).
- ``cpu``: the smoke model on ../shared/data/text (C4 sample + Wikipedia) for up to 30
  minutes: held-out masked-byte accuracy above twice the baseline (train/LEARNING.md).
- ``small``: a ~10M-parameter model on ../shared/data/text, the original's settings.
- ``screen``: the starting point of train/LEARNING.md's ablation (the original's
  initialisation and objective at 256 bytes; stays on the unigram plateau).
- ``paper``: the released 201M model with the paper's pretraining hyperparameters
  (final version, Table 12), for accelerator pods. Point ``data.sources.*.paths`` at
  your copies of C4 and Wikipedia.

Every field can be overridden from the command line, e.g.
``--config.optimizer.learning_rate=1e-3``; an unknown field is an error naming it.
Fields marked "chosen here" are not given by the paper.
"""

import ml_collections

from perceiver import configs as model_configs


def _base() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0

  c.data = ml_collections.ConfigDict()
  # name -> {paths: comma-separated globs, weight: mixing weight, text_field: JSON field}.
  # The paper and model card: 70% C4, 30% Wikipedia.
  c.data.sources = {
      'c4': {'paths': 'data/c4/en/c4-train.*-of-01024.json.gz', 'weight': 0.7,
             'text_field': 'text'},
      'wikipedia': {'paths': 'data/wikipedia/*.jsonl', 'weight': 0.3, 'text_field': 'text'},
  }
  c.data.eval_paths = 'data/c4/en/c4-validation.00000-of-00008.json.gz'
  c.data.eval_text_field = 'text'
  # Paper / model card: 10 documents concatenated, then split into consecutive
  # max_seq_len crops, every crop an example (the last one padded): each byte is trained
  # on once per epoch, and padding is rare.
  c.data.docs_per_example = 10
  # Chosen here: the tokenizer's SEP id between concatenated documents, so the model sees
  # where one document ends ('sep', 'eos', 'newline' or 'none').
  c.data.separator = 'sep'
  # Chosen here: examples are built in blocks of this size (a block's source draws are
  # seeded together; a resumed run rebuilds the block it stopped in).
  c.data.block_size = 1024
  # Chosen here: each source keeps this many concatenations open and takes its crops
  # from them in turn, in a seeded order each round (train/data.py), and a host batch of
  # B takes B // data.streams (or one more) rows of every stream (disjoint shares of the
  # corpus). Guarantee: a batch holds at most 2 crops of one concatenation (of
  # docs_per_example documents) while each stream has at least B / data.streams of its
  # concatenations open -- whatever the document lengths and max_seq_len -- and never more
  # than B / data.streams rounded up (a stream's share with fewer documents than that ends
  # each epoch on its longest ones), where one long document's consecutive crops once
  # filled whole batches (tests/test_input_pipeline.py; bench.mixing measures it).
  # Memory: the open concatenations, 2 bytes a byte (C4, 10 documents: about 45 MB per
  # source and stream).
  c.data.open_concatenations = 1024
  c.data.prefetch = 8            # host batches prepared ahead by a background thread
  # Chosen here: each host's data is this many streams, each reading its own share of the
  # host's shards (as that many hosts would); each host batch takes its rows from all of
  # them (see open_concatenations).
  # The batches depend on it (a resumed run must keep it), not on data.workers; at most
  # this many workers can be busy. A source with fewer records (in its largest file) than
  # hosts x streams readers, and fewer files, e.g. one document, would leave readers with
  # nothing: the run then uses the largest count at which every reader has records of
  # every source (train/data.py fitting_streams; it says so at the start), so each record
  # is in one stream, each byte trained on once per epoch, and a resume gets the same count.
  c.data.streams = 8
  # Processes that read, parse, crop and mask (train/workers.py); 0: a thread of the
  # training process. Any value gives the same batches. Chosen here: 0 for the CPU presets
  # (the model needs the cores, and the input keeps up: train/README.md), more for the
  # paper preset (see paper()).
  c.data.workers = 0
  # Chosen here: the longest the trainer waits for one batch before it stops with an error
  # naming the data worker (index and pid) or reading thread it waits on: a worker that
  # stopped without dying (SIGSTOP, a hung network read) otherwise stalls the run forever.
  # No checkpoint is written then; the ones written are kept. 600 s is far above any
  # healthy wait (worker start-up, a cold shard, parsing a 300 MB one-line document under
  # load), and frees a hung pod's hosts within ten minutes. 0: no bound.
  c.data.batch_timeout_s = 600.0
  # Empty: each host reads its own share. 'I/N,J/N,...': read the shares of hosts I, J of
  # an N-host run instead, one after the other in each batch: a one-host run with as many
  # devices then sees the global batches of that multi-host run (to reproduce it).
  c.data.hosts = ''

  c.masking = ml_collections.ConfigDict()
  c.masking.mask_prob = 0.15     # paper: 15% of words
  c.masking.include_leading_space = True   # chosen here; see train/masking.py
  c.masking.bert_replacement = False       # chosen here: the paper does not mention 80/10/10
  # 'word': the paper's whole words; 'byte': single bytes (this project's option, for
  # CPU-sized runs; see train/LEARNING.md).
  c.masking.unit = 'word'

  c.optimizer = ml_collections.ConfigDict()
  c.optimizer.name = 'lamb'      # paper, Table 12
  c.optimizer.learning_rate = 0.00125
  c.optimizer.warmup_steps = 1000
  c.optimizer.decay = 'cosine'
  c.optimizer.decay_steps = 500_000
  c.optimizer.weight_decay = 0.01
  c.optimizer.b1 = 0.9           # chosen here (optax / BERT-LAMB defaults)
  c.optimizer.b2 = 0.999
  c.optimizer.eps = 1e-6
  c.optimizer.clip_grad_norm = 1.0   # chosen here; <= 0 disables
  # 'optax': optax's own LAMB chain; 'fused': the same algorithm in fewer passes over the
  # parameters (perceiver.training.optim.fused_lamb), faster on XLA:CPU; 'auto': fused where the step
  # is lowered for the CPU, optax elsewhere. Same state: checkpoints carry over.
  c.optimizer.implementation = 'auto'

  c.train = ml_collections.ConfigDict()
  c.train.steps = 500_000
  # Global batch (sequences) = per-device batch x devices x grad_accum_steps. Table 12
  # gives 2048; another account of the same model says 512 -- the paper's value is used.
  c.train.batch_size = 2048
  c.train.grad_accum_steps = 1
  # Decode only the masked positions (the decoder's queries are positions): same loss,
  # less compute. Chosen here: off, to compute exactly what the released model computes.
  c.train.decode_masked_only = False
  c.train.max_predictions = 0    # query slots per sequence with decode_masked_only; 0 = auto
  # This project's option (0: the paper's objective, masked bytes only): the weight, relative
  # to a masked byte, of each unmasked byte's reconstruction loss in the training objective.
  # The logged loss and accuracy stay the masked bytes'. See train/LEARNING.md.
  c.train.unmasked_loss_weight = 0.0
  c.train.log_every = 100
  c.train.eval_every = 5000
  c.train.eval_batches = 10
  c.train.checkpoint_every = 2000
  c.train.keep_checkpoints = 3
  # Peak FLOP/s of one device, for the logged MFU estimate (0: MFU not logged).
  c.train.peak_flops_per_device = 0.0
  # Chosen here: after SIGTERM/SIGINT, the seconds allowed for every host to reach the
  # same step and save; past them the process exits with status 3 instead of hanging.
  c.train.stop_timeout_s = 300.0
  # A resumed run must keep the data, masking and batch settings of the run it continues
  # (its data position means nothing otherwise); True accepts changes, listing them.
  c.train.allow_changes = False
  # Stop (with a checkpoint, as on SIGTERM) once the run has taken this many seconds of
  # wall-clock time in this process; 0: no limit. For runs budgeted by time, not steps.
  c.train.max_seconds = 0.0

  # The device mesh every step is jitted over (perceiver.training.mesh): ``data`` devices
  # each holding a copy of the state, times ``fsdp`` devices sharing one copy (each matrix
  # of the parameters and optimizer state split over them). -1: every device the other
  # axis leaves. Chosen here: plain data parallelism, the fastest while the state fits a
  # device (201M parameters + LAMB: 3.2 GB); set fsdp=-1 (or the devices of one host) for
  # a model that does not fit. The product must be all devices of all hosts.
  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = -1
  c.mesh.fsdp = 1

  # Multi-host: initialise jax.distributed (arguments left empty are auto-detected on
  # TPU pods, SLURM and other supported clusters).
  c.distributed = ml_collections.ConfigDict()
  c.distributed.enabled = False
  c.distributed.coordinator_address = ''
  c.distributed.num_processes = 0
  c.distributed.process_id = -1
  # Seconds without a heartbeat before the coordination service declares a host dead and
  # ends every process (0: JAX's default, 100 s).
  c.distributed.heartbeat_timeout_s = 0
  # Seconds to wait at start-up for the coordinator (process 0: for every process) before
  # exiting with an error naming the address. Chosen here, well under JAX's own 300 s
  # (after which it aborts with a C++ stack trace): launchers start all processes within
  # seconds; raise it where they start minutes apart.
  c.distributed.initialization_timeout_s = 60.0
  return c


def _with_model(c, model):
  c.model = model
  # Chosen here: the paper lists no dropout for pretraining; 0.0 (the original's default).
  c.model.encoder.dropout_prob = 0.0
  return c


def _short_cpu_run(c, learning_rate, eval_batches):
  """300 steps of 16 sequences with frequent logs, for a CPU."""
  c.data.block_size = 256
  c.optimizer.learning_rate = learning_rate
  c.optimizer.warmup_steps = 30
  c.optimizer.decay_steps = 300
  c.train.update(dict(steps=300, batch_size=16, log_every=25, eval_every=100,
                      eval_batches=eval_batches, checkpoint_every=100))
  c.train.peak_flops_per_device = 2e11   # about this class of CPU's float32 matmul peak
  return c


def _shared_text(c, eval_batches=8):
  shared = '../shared/data/text'
  c.data.sources = {
      'c4': {'paths': f'{shared}/c4/c4-train.00000-of-01024.first1000.json.gz',
             'weight': 0.7, 'text_field': 'text'},
      'wikipedia': {'paths': f'{shared}/wikipedia/train.jsonl', 'weight': 0.3,
                    'text_field': 'text'},
  }
  c.data.eval_paths = f'{shared}/wikipedia/valid.jsonl'
  c.train.eval_batches = eval_batches
  return c


def screen():
  """The ablation's starting point (train/LEARNING.md): the former smoke preset (the
  original's initialisation and objective, 256 bytes) on ../shared text, constant LR."""
  c = _with_model(_base(), model_configs.with_position_init(model_configs.cpu_sized(256)))
  _short_cpu_run(c, learning_rate=3e-3, eval_batches=8)
  _shared_text(c)
  c.data.block_size = 256
  c.train.steps = 100_000
  c.train.eval_every = 250
  c.train.log_every = 50
  c.train.checkpoint_every = 100_000
  c.optimizer.decay = 'constant'
  return c


def learning_settings(c):
  """What makes a small model leave the unigram plateau in minutes (train/LEARNING.md).

  None of these changes a parameter name or shape; the paper preset keeps the original's.
  """
  # This project's option: single bytes, not whole words. With whole words the context-free
  # guess (the space every masked span starts with) plus the span's shape already scores
  # 1.65x the baseline, and more needs whole words guessed from the sentence.
  c.masking.unit = 'byte'
  # Sines and cosines (times 1.0) instead of truncated normal 0.02 for all three position
  # tables: neighbouring positions start alike, so addressing a position also reaches its
  # neighbours, and the latents start distinct instead of 50x smaller than the bytes.
  model_configs.with_position_init(c.model, 'sinusoid', 1.0)
  # This project's objective term: the unmasked bytes' reconstruction, each weighted 0.2 of
  # a masked byte (the two means about equal at 15% masking). It teaches the latents a
  # position-addressable copy of the input within a few hundred steps; masked bytes are
  # then read from their neighbours' entries. Logged losses stay the masked bytes'.
  c.train.unmasked_loss_weight = 0.2
  return c


def cpu():
  """Learns to use context within 30 minutes on a 2-core CPU (train/LEARNING.md)."""
  # 64 bytes: 2 per latent; the copy is learned fast at this length (LEARNING.md).
  c = _with_model(_base(), model_configs.with_position_init(model_configs.cpu_sized(64)))
  _shared_text(c, eval_batches=16)
  c.data.docs_per_example = 1    # a 64-byte crop needs one document, not ten
  c.data.block_size = 256
  learning_settings(c)
  c.optimizer.learning_rate = 3e-3   # chosen here for the small model (the smoke preset's)
  c.optimizer.warmup_steps = 100     # chosen here: short run
  c.optimizer.decay_steps = 20_000
  c.train.update(dict(steps=20_000, batch_size=32, log_every=200, eval_every=1000,
                      checkpoint_every=2000))
  # Stops by itself within 30 minutes of wall-clock time (set-up included) if the
  # 20,000 steps take longer on a slower machine.
  c.train.max_seconds = 29 * 60
  c.train.peak_flops_per_device = 2e11
  return c


def paper():
  c = _with_model(_base(), model_configs.language_mlm())
  # Chosen here: an 8-accelerator host needs about 9,800 sequences/s at 45% MFU; a worker
  # spends 134-154 us of CPU per sequence (bench/RESULTS.md, data suite), about 6,800
  # sequences/s per core, so 8 workers (one per stream) give several times the need and
  # leave a host's other cores to the training process. Same batches at any value.
  c.data.workers = 8
  return c


def smoke():
  """The README's first command: learns to use context in about a minute on a CPU."""
  # 64 bytes (was 256): at this length the learning settings below leave the unigram
  # plateau within ~1,000 steps (train/LEARNING.md).
  c = _with_model(_base(), model_configs.with_position_init(model_configs.cpu_sized(64)))
  c.data.sources = {'stdlib': {'paths': 'builtin:stdlib_docstrings/train', 'weight': 1.0,
                               'text_field': 'text'}}
  c.data.eval_paths = 'builtin:stdlib_docstrings/valid'
  c.data.docs_per_example = 1   # a module's docstrings fill 64 bytes many times over
  learning_settings(c)
  _short_cpu_run(c, learning_rate=3e-3, eval_batches=8)
  # 2,000 steps of 32 (was 300 of 16): the plateau is left near step 1,000, and the
  # last evaluation is well above the baseline (about twice it; README).
  c.optimizer.warmup_steps = 100
  c.optimizer.decay_steps = 2000
  c.train.update(dict(steps=2000, batch_size=32, log_every=100, eval_every=500,
                      checkpoint_every=500))
  return c


def small():
  c = _with_model(_base(), model_configs.small(max_seq_len=512))
  _shared_text(c)
  return _short_cpu_run(c, learning_rate=2e-3, eval_batches=8)


# The GPUs people have, for the paper preset: devices per host, memory per device, the
# dense bfloat16 peak FLOP/s of the device taken for the throughput figures (an NVIDIA A10
# for 24 GB, an H100 for 80 GB: published figures), and the largest per-device batch
# whose compiled peak (remat on, bench.scale's memory part; bench/RESULTS.md) leaves
# GPU_MARGIN of the memory free for XLA's own workspace and fragmentation.
GPU_MARGIN = 0.2
GPU_HOSTS = {
    'gpu_24gb': dict(devices=1, memory_gib=24, peak_flops=125e12, per_device_batch=64),
    'gpu_80gb': dict(devices=1, memory_gib=80, peak_flops=989e12, per_device_batch=256),
    'gpus_8x80gb': dict(devices=8, memory_gib=80, peak_flops=989e12,
                        per_device_batch=256),
}


def _gpu_host(name, global_batch=None, steps=None):
  """The paper preset on ``GPU_HOSTS[name]``: every attention block rematerialised,
  bfloat16 matmuls, the per-device batch that fits, and the global batch (the paper's,
  or ``global_batch``) reached by accumulating micro-batches."""
  host = GPU_HOSTS[name]
  c = paper()
  c.model.remat = 'block'
  c.model.compute_dtype = 'bfloat16'
  c.train.batch_size = global_batch or c.train.batch_size
  c.train.steps = steps or c.train.steps
  micro = host['per_device_batch'] * host['devices']
  c.train.grad_accum_steps = max(1, c.train.batch_size // micro)
  c.train.batch_size = c.train.grad_accum_steps * micro
  c.train.peak_flops_per_device = host['peak_flops']
  c.train.max_seconds = 0.0   # a run of days, not a 29-minute sandbox
  return c


def gpu_24gb():
  """The released model pretrained on one 24 GB GPU (figures: README, Scale)."""
  return _gpu_host('gpu_24gb')


def gpu_24gb_short():
  """What a one-GPU user runs first: 1/8 of the paper's global batch for 1/5 of its
  steps (1/40 of its sequences), on one 24 GB GPU; the trade is in the README (Scale)."""
  return _gpu_host('gpu_24gb', global_batch=256, steps=100_000)


def gpu_80gb():
  """The released model pretrained on one 80 GB GPU (figures: README, Scale)."""
  return _gpu_host('gpu_80gb')


def gpus_8x80gb():
  """The released model pretrained on a host of 8 x 80 GB GPUs, data-parallel."""
  return _gpu_host('gpus_8x80gb')


PRESETS = {'paper': paper, 'smoke': smoke, 'small': small, 'screen': screen, 'cpu': cpu,
           'gpu_24gb': gpu_24gb, 'gpu_24gb_short': gpu_24gb_short, 'gpu_80gb': gpu_80gb,
           'gpus_8x80gb': gpus_8x80gb}


def get_config(preset: str = 'smoke') -> ml_collections.ConfigDict:
  return model_configs.from_presets(PRESETS, preset or 'smoke',
                                    'unknown preset {name!r} for train/configs/mlm.py')
