"""Evaluation metrics: Fréchet distance / KID (`frechet`), the FID Inception (`inception`),
an offline digit-feature network (`digit_features`), DINOv2 (`dinov2`, the paper's
features `dinov2_features`) and the memorization attack (`memorization`). Importing this
package imports numpy only; submodules import jax/flax.
"""
