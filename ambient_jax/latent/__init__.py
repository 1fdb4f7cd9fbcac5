"""Pretrained latent diffusion (Stable Diffusion 1.x/2.x, SDXL) in Flax NNX.

Modules mirror diffusers / transformers one to one (parameter paths = checkpoint names),
are built from each component's own `config.json`, and load the user's diffusers folder
from safetensors with numpy alone: no torch at run time.
"""
