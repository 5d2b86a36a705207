"""Token classification (tagging) configs: ``--config=eval/configs/tagging.py[:preset]``.

Presets:
- ``paper`` (default): the released model (``--init_checkpoint=language_perceiver_io_bytes
  .pickle``) on CoNLL-2003. The paper has no tagging experiment: every value is chosen
  here, from BERT's NER fine-tuning (3 epochs, batch 32, learning rate 5e-5, dropout 0.1)
  with the paper's GLUE optimizer (LAMB, 200 warm-up steps, weight decay 0.01).
- ``smoke``: the model of train/configs/mlm.py's ``smoke`` and ``cpu`` presets (64-byte
  windows), from scratch or from such a checkpoint: a generated task learns in about a
  CPU minute (tests/test_tagging.py); on CoNLL-2003 it checks the pipeline.

The model: with ``--init_checkpoint`` its stored config (``configs.language_mlm()`` for
DeepMind's pickle) and ``model`` here is ignored; without one, ``model`` is built from
scratch. Either way ``dropout`` below is applied to it.

Every field can be overridden from the command line (``--config.train.epochs=5``); an
unknown field is an error naming it.
"""

import ml_collections

from eval.configs import finetune
from perceiver import configs as model_configs


def _base() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.model = model_configs.language_mlm()   # the presets but ``paper`` set their own
  c.seed = 0   # the new decoder/head's init, dropout, data order, train subset

  c.data = ml_collections.ConfigDict()
  # 'conll2003' (word POS chunk NER lines) or 'conllu' (Universal Dependencies); see
  # eval/tagging/data.py for the files each looks for.
  c.data.format = 'conll2003'
  # The tag's column: 0 means the format's own (conll2003: -1, the NER tag; conllu: 3,
  # UPOS). E.g. 1 for CoNLL-2003's POS tags, 2 for its chunks, 4 for CoNLL-U's XPOS.
  c.data.label_column = 0
  # Bytes per window; 0: the model's max_seq_len. A longer sentence is split into
  # windows of whole words (eval/tagging/data.py), counted in the log and dev_metrics.json.
  c.data.max_seq_len = 0
  # Bytes of words consecutive windows of one long sentence share (as context for each
  # other; each word is scored once). Chosen here: a quarter of the 2048-byte window.
  c.data.window_overlap = 512
  # Each split is padded to its longest window rounded up to this many bytes (so the
  # train and each predict step compile once, for one shape), capped at the window.
  c.data.length_multiple = 32
  # Train on a seeded random subset of at most this many sentences (0: all).
  c.data.max_train_sentences = 0

  c.init = ml_collections.ConfigDict()
  # With --init_checkpoint: also start the token decoder (one query per byte position)
  # from the checkpoint's masked-LM decoder, which has its structure. Chosen here: its
  # position queries already address single bytes of the latents.
  c.init.mlm_decoder = True

  c.dropout = ml_collections.ConfigDict()
  # BERT's fine-tuning dropout (chosen here): the encoder's attention and MLP blocks,
  # and the tag head's inputs.
  c.dropout.encoder = 0.1
  c.dropout.head = 0.1

  # Chosen here: BERT's NER fine-tuning (3 epochs, batch 32, learning rate 5e-5) with the
  # paper's GLUE optimizer; 64 windows per predict call.
  finetune.add_blocks(c, epochs=3, eval_batch_size=64)
  # 'auto': entity-level F1 (seqeval) for IOB tags, word accuracy otherwise (POS);
  # 'entity' or 'accuracy' to choose. It picks the best epoch.
  c.eval.metric = 'auto'
  return c


def paper() -> ml_collections.ConfigDict:
  return _base()   # the released model (configs.language_mlm())


def smoke() -> ml_collections.ConfigDict:
  # Chosen here: the small model needs a larger step (the GLUE cpu preset's, 1e-3, was
  # too slow on the generated task; 3e-3 is the MLM smoke preset's).
  c = finetune.cpu_model(_base(), learning_rate=3e-3)
  c.data.window_overlap = 16           # a quarter of the 64-byte window
  c.data.length_multiple = 16
  c.train.epochs = 10
  c.train.batch_size = 32
  c.train.log_every = 50
  return c


PRESETS = {'paper': paper, 'smoke': smoke}


def get_config(preset: str = 'paper') -> ml_collections.ConfigDict:
  return model_configs.from_presets(PRESETS, preset or 'paper',
                                    'unknown preset {name!r} for eval/configs/tagging.py')
