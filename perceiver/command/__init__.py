"""Command plumbing every ``python -m`` entry point shares: start-up and flag errors
(``cli``), signals (``signal_guard``), the project's one-line errors (``errors``), and
atomic file writes (``atomic``). Light: imports no JAX."""
