"""Perceiver IO for language: JAX/Haiku model, MLM pretraining, GLUE fine-tuning."""

from setuptools import find_packages, setup

setup(
    name='perceiver-io-jax',
    version='0.1.0',
    description=('Byte-level Perceiver IO masked language model in JAX/Haiku, faithful to '
                 "DeepMind's released checkpoint, with MLM pretraining and GLUE fine-tuning."),
    packages=find_packages(include=['perceiver', 'perceiver.*', 'train', 'train.*', 'eval',
                                    'eval.*', 'bench', 'bench.*']),
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
        # Parquet pretraining shards (train/data.py), e.g. wikimedia/wikipedia as distributed.
        'pyarrow>=14',
    ],
    extras_require={
        'dev': ['pytest>=7'],
        # Hugging Face checkpoints (perceiver.hf_io, perceiver.convert): model.safetensors
        # read and written by the safetensors package's numpy API (no torch needed), and
        # transformers' PyTorch PerceiverForMaskedLM for .bin checkpoints and the interop
        # tests. Validated together: transformers 5.24.0 requires torch>=2.6 and
        # Python>=3.11. Off PyPI's default index torch is a CUDA build; for CPU add
        # --extra-index-url https://download.pytorch.org/whl/cpu.
        'safetensors': ['safetensors>=0.4'],
        'hf': ['safetensors>=0.4', 'transformers==5.24.0', 'torch==2.13.0'],
        # python -m bench.run: the peer rows (transformers' PyTorch PerceiverForMaskedLM).
        # Without it the benchmark runs and those rows say "not installed".
        'bench': ['safetensors>=0.4', 'transformers==5.24.0', 'torch==2.13.0'],
        # python -m train.plot: learning curves as a PNG.
        'plot': ['matplotlib>=3.7'],
    },
    license='Apache-2.0',
)
