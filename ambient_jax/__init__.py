"""ambient_jax: diffusion models that sample clean images from noisy training data.

The math (`losses`, `sampling`, `precond`) imports only jax, numpy and chex, so
`from ambient_jax import losses` is cheap in another project.
"""

__version__ = "0.1.0"
