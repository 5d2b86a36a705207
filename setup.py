"""Perceiver IO for language: JAX/Haiku model, MLM pretraining, GLUE fine-tuning."""

from setuptools import find_packages, setup

setup(
    name='perceiver-io-jax',
    version='0.1.0',
    description=('Byte-level Perceiver IO masked language model in JAX/Haiku, faithful to '
                 "DeepMind's released checkpoint, with MLM pretraining and GLUE fine-tuning."),
    packages=find_packages(include=['perceiver', 'perceiver.*', 'train', 'train.*', 'eval',
                                    'eval.*', 'bench', 'bench.*']),
    # The export loader (python -m perceiver.export): outside the perceiver package so
    # that it imports neither Haiku nor this project.
    py_modules=['perceiver_load'],
    python_requires='>=3.10',
    install_requires=[
        'jax>=0.4.30',
        'jaxlib>=0.4.30',
        'dm-haiku>=0.0.13',
        'optax>=0.2.5',
        'numpy>=1.24',
        'chex>=0.1.86',
        'absl-py>=1.4',
        'ml-collections>=0.1.1',
        # Hugging Face checkpoints (perceiver.params.hf_io, perceiver.convert): model.safetensors is
        # read and written through the safetensors package's numpy API, no torch needed;
        # perceiver.deploy.export writes, and perceiver_load reads, an export's parameters so.
        'safetensors>=0.4',
        # jax.export's serialization (perceiver.deploy.export writes, perceiver_load reads a
        # serialized program); jax does not install it itself.
        'flatbuffers>=23.0',
        # python -m train.plot: learning curves as a PNG.
        'matplotlib>=3.7',
        # eval.tagging's entity-level precision, recall and F1 (conlleval's reading).
        'seqeval>=1.2',
        # Parquet pretraining shards (train/data.py), e.g. wikimedia/wikipedia as distributed.
        'pyarrow>=14',
        # A run's checkpoints (perceiver/training/run_checkpoints.py): each host writes its
        # own shards, asynchronously; a restore reads them into any mesh's layout.
        'orbax-checkpoint>=0.12',
    ],
    extras_require={
        'dev': ['pytest>=7', 'pytest-xdist>=3'],
        # PyTorch interop, kept out of the core so that a JAX install does not pull in a
        # second framework: transformers' PerceiverForMaskedLM, for pytorch_model.bin
        # checkpoints (loaded in torch's weights-only mode) and for the tests and
        # benchmarks that hold this model to transformers' port. Validated together:
        # transformers 5.24.0 requires torch>=2.6 and Python>=3.11. Off PyPI's default
        # index torch is a CUDA build; for CPU add
        # --extra-index-url https://download.pytorch.org/whl/cpu.
        # onnx and onnxruntime: the ONNX route (perceiver.deploy.onnx) and its test.
        'hf': ['transformers==5.24.0', 'torch==2.13.0', 'onnx>=1.16', 'onnxruntime>=1.18'],
        # python -m bench.run: the peer rows (the same port). Without it the benchmark
        # runs and those rows say "not installed".
        'bench': ['transformers==5.24.0', 'torch==2.13.0'],
    },
    license='Apache-2.0',
)
