"""GLUE fine-tuning: ``python -m eval.glue`` (the command: ``eval.glue.app``).

Its own parts, on the fine-tuning skeleton ``eval.finetune`` it shares with
``eval.tagging``: ``data`` (the task files), ``inputs`` (encoding and batches), ``task``
(loss, scores, the ``GlueTask``), ``metrics`` (the official scores and the table),
``outputs`` (submission and dev prediction files), ``runs`` (one task: a run or a sweep,
and its test predictions) and ``app`` (every task, the flags). Nothing is imported here,
so ``python -m eval.glue`` installs its signal guard before JAX starts.
"""
