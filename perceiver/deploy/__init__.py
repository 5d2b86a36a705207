"""Deployment: ``jax.export`` artifacts that run without this code (``export``; read by
the top-level ``perceiver_load``) and the ONNX route through transformers (``onnx``)."""
