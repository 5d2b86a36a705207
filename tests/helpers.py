"""Helpers the test modules share: where data lives, the released model's parameter list,
a tiny checkpoint, a command's failure as its one ``error:`` line, and seconds-fast
configs for the MLM, GLUE and tagging apps.

Import them as ``from tests import helpers`` (``tests`` is a package, so this works under
``pytest`` and ``python -m pytest`` alike, and in the scripts subprocess tests run from the
project's root).
"""

import hashlib
import io
import json
import os
import pathlib
from contextlib import redirect_stderr

import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
SHARED = pathlib.Path(os.environ.get('PERCEIVER_SHARED', ROOT.parent / 'shared'))

# DeepMind's released language_perceiver_io_bytes.pickle: its 457 parameters as
# ``module/name [shape]`` lines, listed from the original code's init for the MLM colab's
# configuration. Shipped with the tests so the headline check runs on a fresh clone.
RELEASED_PARAMETERS = ROOT / 'tests' / 'data' / 'released_parameters.txt'

# The released model's architecture (paper Table 11; the MLM colab's keyword arguments),
# written out here rather than taken from perceiver.configs, which the tests check.
RELEASED_ARCHITECTURE = dict(
    vocab_size=262, d_model=768, max_seq_len=2048,
    encoder=dict(num_self_attends_per_block=26, num_blocks=1, z_index_dim=256,
                 num_z_channels=1280, num_self_attend_heads=8, num_cross_attend_heads=8,
                 qk_channels=256, v_channels=1280, use_query_residual=True,
                 cross_attend_widening_factor=1, self_attend_widening_factor=1),
    decoder=dict(output_num_channels=1280, position_encoding_type='trainable',
                 output_index_dims=2048, num_z_channels=1280, qk_channels=256,
                 v_channels=768, num_heads=8, final_project=False, use_query_residual=False,
                 trainable_position_encoding_kwargs=dict(num_channels=768)),
)


def params_like(transformed, *inputs, seed=0, scale=0.02):
  """Parameters of ``transformed``'s tree (names, shapes, dtypes from ``jax.eval_shape``
  of its ``init``), filled with numpy normals of std ``scale``: the tree without
  compiling or running the model's initialisers, for tests that need a checkpoint's
  structure and distinct values, not the initialisers' distributions (``tests/test_model.py``
  tests those)."""
  import jax  # pylint: disable=import-outside-toplevel
  shapes = jax.eval_shape(transformed.init, jax.random.PRNGKey(0), *inputs)
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda s: (scale * rng.standard_normal(s.shape)).astype(s.dtype),
                      shapes)


def assert_released_architecture(model_config):
  """``model_config`` (a ConfigDict) has the released model's architecture; fields this
  project adds (dropout, compute dtype, kernels, the classifier head) are not compared."""
  got = model_config.to_dict()
  for key in ('vocab_size', 'd_model', 'max_seq_len'):
    assert got[key] == RELEASED_ARCHITECTURE[key], key
  for block in ('encoder', 'decoder'):
    for key, want in RELEASED_ARCHITECTURE[block].items():
      assert got[block][key] == want, f'{block}.{key}: {got[block][key]!r} != {want!r}'


def shared_path(*parts):
  """A path under ../shared, or a skip naming what is missing (a user's fresh machine)."""
  path = SHARED.joinpath(*parts)
  if not path.exists():
    pytest.skip(f'{path} not found: these tests read the data in ../shared '
                '(set PERCEIVER_SHARED to its location)')
  return path


def glue_dir():
  """The GLUE directory for real-data tests: $PERCEIVER_GLUE_DIR, else ../shared/data/glue.

  Skips, naming PERCEIVER_GLUE_DIR, where neither is a directory (a user's fresh machine).
  """
  env = os.environ.get('PERCEIVER_GLUE_DIR')
  candidates = ([pathlib.Path(env)] if env else []) + [SHARED / 'data' / 'glue']
  for path in candidates:
    if path.is_dir():
      return path
  pytest.skip('no GLUE directory: set PERCEIVER_GLUE_DIR to one laid out as the GLUE '
              f'download script writes it (tried {", ".join(map(str, candidates))})')


def released_param_shapes(path=RELEASED_PARAMETERS):
  """{'module/name': shape} of DeepMind's released checkpoint."""
  shapes = {}
  for line in pathlib.Path(path).read_text().splitlines():
    name, shape = line.split(' ', 1)
    shapes[name] = tuple(int(d) for d in shape.strip('[]').split(','))
  return shapes


def records(workdir, kind='train'):
  """The ``kind`` records of a run's metrics.jsonl."""
  lines = pathlib.Path(workdir, 'metrics.jsonl').read_text().splitlines()
  return [r for r in map(json.loads, lines) if r['kind'] == kind]


# --------------------------------------------------------------------------------------
# A tiny checkpoint, and a command's failure: one ``error:`` line, nothing written.

def tiny_mlm_params():
  """(``perceiver.configs.tiny()``, parameters of its masked LM from ``params_like``)."""
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from perceiver import configs  # pylint: disable=import-outside-toplevel
  from perceiver import transform  # pylint: disable=import-outside-toplevel
  config = configs.tiny()
  return config, params_like(transform.masked_lm(config), jnp.zeros((1, 8), jnp.int32))


def save_tiny_checkpoint(path):
  """Writes ``tiny_mlm_params`` as a parameter file at ``path``; returns its path (str)."""
  from perceiver.params import params_file  # pylint: disable=import-outside-toplevel
  config, params = tiny_mlm_params()
  return str(params_file.save(path, params, config))


def snapshot(directory):
  """{relative path: sha256} of every file under ``directory``."""
  out = {}
  for path in sorted(pathlib.Path(directory).rglob('*')):
    if path.is_file() and path.name != '.lock':
      out[str(path.relative_to(directory))] = hashlib.sha256(path.read_bytes()).hexdigest()
  return out


def run_command(command):
  """(exit status, stderr) of ``command`` under the commands' error policy
  (``perceiver.command.cli.run``)."""
  from perceiver.command import cli  # pylint: disable=import-outside-toplevel
  stderr = io.StringIO()
  with redirect_stderr(stderr):
    status = cli.run(command)
  return status, stderr.getvalue()


def one_error_line(stderr):
  """The only line of ``stderr``, which must start with ``error: ``."""
  lines = stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith('error: '), stderr
  return lines[0]


# --------------------------------------------------------------------------------------
# MLM pretraining (train.mlm) on a generated corpus.

def write_mlm_corpus(directory, name='corpus.jsonl', count=300, seed=0):
  """``count`` JSON-lines documents of Greek-letter words: enough for a few batches."""
  rng = np.random.default_rng(seed)
  words = ['alpha', 'beta', 'gamma', 'delta', 'epsilon', 'zeta', 'eta', 'theta', 'iota']
  lines = []
  for i in range(count):
    text = ' '.join(rng.choice(words, size=rng.integers(5, 30)))
    lines.append(json.dumps({'text': f'Doc {i}: {text}.'}))
  path = pathlib.Path(directory) / name
  path.write_text('\n'.join(lines) + '\n')
  return str(path)


def mlm_tiny_config(directory, **train):
  """A seconds-fast ``train.mlm`` config on a corpus generated in ``directory``."""
  from perceiver import configs as model_configs   # pylint: disable=import-outside-toplevel
  from train.configs import mlm as mlm_configs     # pylint: disable=import-outside-toplevel
  c = mlm_configs.get_config('smoke')
  c.unlock()
  c.model = model_configs.tiny(max_seq_len=64)
  c.model.encoder.dropout_prob = 0.0
  corpus = write_mlm_corpus(directory)
  c.data.sources = {'gen': {'paths': corpus, 'weight': 1.0, 'text_field': 'text'}}
  c.data.eval_paths = corpus
  c.data.block_size = 32
  c.data.prefetch = 2
  c.train.update(dict(steps=6, batch_size=4, log_every=1, eval_every=0, checkpoint_every=3,
                      eval_batches=1, peak_flops_per_device=0.0))
  c.train.update(train)
  c.optimizer.warmup_steps = 2
  c.optimizer.decay_steps = 100
  c.lock()
  return c


# --------------------------------------------------------------------------------------
# GLUE fine-tuning (eval.glue) on generated task files.

GLUE_SEQ = 64

# Words that give each label away, so a tiny model can learn something in a few steps.
_CUES = ['alpha', 'beta', 'gamma']


def _cell(task, layout, column, i, split_name):
  labels = task.labels
  cue = _CUES[i % 3 if task.is_regression else i % len(labels)]
  if column == layout.label:
    return f'{(i % 3) * 2.5:.3f}' if task.is_regression else labels[i % len(labels)]
  if column == layout.index:
    return str(1000 + i)
  if column == layout.text_a:
    return f'{split_name} row {i} says {cue} here'
  if column == layout.text_b:
    return f'and {cue} again {i % 7}'
  return 'x'


def write_glue_task(root, name, num_train=24, num_dev=10, num_test=6):
  """Writes every split of ``name`` (but MNLI's diagnostic set) in the official layout."""
  from eval.glue import data as glue_data   # pylint: disable=import-outside-toplevel
  task = glue_data.TASKS[name]
  for layout in task.splits:
    if layout.name == 'diagnostic':
      continue
    n = num_train if layout.name == 'train' else (num_dev if layout.label else num_test)
    lines = ['\t'.join(layout.columns)] if layout.has_header else []
    lines += ['\t'.join(_cell(task, layout, c, i, layout.name) for c in layout.columns)
              for i in range(n)]
    path = pathlib.Path(root) / layout.path
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text('\n'.join(lines) + '\n', encoding='utf-8')
  return root


def glue_tiny_config(**overrides):
  """The GLUE smoke preset shrunk to seconds: a tiny model, 64 bytes, small batches.
  ``overrides`` are 'section.field' keys."""
  from eval.configs import glue as glue_configs      # pylint: disable=import-outside-toplevel
  from perceiver import configs as model_configs     # pylint: disable=import-outside-toplevel
  c = glue_configs.get_config('smoke')
  c.model = model_configs.tiny(max_seq_len=GLUE_SEQ)
  c.data.max_train_examples = 0
  c.data.length_multiple = 16
  c.train.update(dict(epochs=2, batch_size=8, log_every=2))
  c.eval.batch_size = 8
  c.optimizer.learning_rate = 3e-3
  c.optimizer.warmup_steps = 2
  c.sweep.batch_sizes = (4, 8)
  c.sweep.learning_rates = (3e-3,)
  for key, value in overrides.items():
    section, field = key.split('.')
    c[section][field] = value
  c.lock()
  return c


# --------------------------------------------------------------------------------------
# Token classification (eval.tagging) on generated CoNLL-2003 files whose tags depend on
# context.

TAGGING_TRIGGERS = {'met': 'PER', 'visited': 'LOC', 'joined': 'ORG'}
TAGGING_NAMES = ['alba', 'boren', 'cato', 'dunmore', 'elko', 'farrow', 'gila', 'hollis',
                 'ivor', 'juno', 'kemp', 'lorne']
_FILLER = ['the', 'a', 'we', 'then', 'quietly', 'today', 'and', 'they', 'soon', 'often',
           'saw', 'said']


def tagging_sentence(rng):
  """2-4 chunks: a trigger, a name tagged by the trigger, a filler word; or a name that
  is no entity (O); or a filler word. The same names take every tag: only the word
  before a name tells its tag."""
  words, tags = [], []
  for _ in range(rng.integers(2, 5)):
    r = rng.random()
    if r < 0.45:
      trigger = list(TAGGING_TRIGGERS)[rng.integers(3)]
      words += [trigger, TAGGING_NAMES[rng.integers(len(TAGGING_NAMES))],
                _FILLER[rng.integers(len(_FILLER))]]
      tags += ['O', 'B-' + TAGGING_TRIGGERS[trigger], 'O']
    else:
      words.append((TAGGING_NAMES if r < 0.7 else _FILLER)[rng.integers(12)])
      tags.append('O')
  return words, tags


def write_tagging_context_task(root, num_train, num_dev=200, seed=0):
  """train.txt and valid.txt in the CoNLL-2003 layout (word POS chunk NER)."""
  root = pathlib.Path(root)
  root.mkdir(parents=True, exist_ok=True)
  for name, count, offset in (('train.txt', num_train, 0), ('valid.txt', num_dev, 1)):
    rng = np.random.default_rng([seed, offset])
    lines = ['-DOCSTART- -X- -X- O', '']
    for _ in range(count):
      words, tags = tagging_sentence(rng)
      lines += [f'{w} X X {t}' for w, t in zip(words, tags)] + ['']
    (root / name).write_text('\n'.join(lines) + '\n', encoding='utf-8')
  return str(root)


def tagging_tiny_config(**overrides):
  """The tagging smoke preset shrunk to seconds: a tiny model, 64 bytes, small batches."""
  from eval.configs import tagging as tagging_configs   # pylint: disable=import-outside-toplevel
  from perceiver import configs as model_configs        # pylint: disable=import-outside-toplevel
  c = tagging_configs.get_config('smoke')
  c.model = model_configs.tiny(max_seq_len=64)
  c.train.update(dict(epochs=2, batch_size=8, log_every=5))
  c.eval.batch_size = 16
  c.optimizer.warmup_steps = 2
  for key, value in overrides.items():
    section, field = key.split('.')
    c[section][field] = value
  c.lock()
  return c
