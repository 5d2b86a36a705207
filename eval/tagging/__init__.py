"""Token classification (NER, POS): ``python -m eval.tagging`` (the command:
``eval.tagging.app``).

Its own parts, on the fine-tuning skeleton ``eval.finetune`` it shares with
``eval.glue``: ``data`` (CoNLL-2003 and CoNLL-U readers, word-to-byte alignment,
windows), ``inputs`` (batches of windows), ``task`` (loss, seqeval scores, prediction
files, the ``TaggingTask``) and ``app`` (the run, the flags). Nothing is imported here, so
``python -m eval.tagging`` installs its signal guard before JAX starts.
"""
