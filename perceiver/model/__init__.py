"""The model: the Haiku modules (``modules``: the Perceiver wiring, encoder, processor,
decoders and heads; ``layers``: attention blocks and how they compute), the byte
tokenizer, the position encodings, the XLA:CPU kernels (``xla_cpu``) and the FLOP count
(``flops``). Imports nothing on its own, so ``perceiver.model.tokenizer`` stays light."""
