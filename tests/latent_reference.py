"""Shared pieces of the latent-model parity tests: PyTorch references built in the test.

torch, diffusers and transformers come from the `test` extra (torch pinned to 2.13.0, a
CPU wheel); nothing here downloads anything. Tiny random models are made by those
libraries themselves, every parameter perturbed (so that a swapped GroupNorm / LayerNorm
or a zero-initialised layer cannot hide a mis-mapped name), and saved with
`save_pretrained`; ambient_jax then loads the folder as a user's checkpoint.
"""

import numpy as np
import torch


def perturb_(module: "torch.nn.Module", seed: int = 0, scale: float = 0.2) -> "torch.nn.Module":
  """Adds seeded noise to every parameter in place (scale · max(std, 0.05) · N(0, 1))."""
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for p in module.parameters():
      spread = max(float(p.float().std()) if p.numel() > 1 else 0.0, 0.05)
      p.add_(scale * spread * torch.randn(p.shape, generator=gen, dtype=p.dtype))
  return module.eval()


def nchw_to_nhwc(t) -> np.ndarray:
  """torch [B, C, H, W] -> numpy [B, H, W, C]."""
  return np.transpose(t.detach().float().numpy(), (0, 2, 3, 1))


def nhwc_to_nchw(a) -> "torch.Tensor":
  """numpy/jax [B, H, W, C] -> torch [B, C, H, W] float32."""
  return torch.from_numpy(np.ascontiguousarray(np.transpose(np.asarray(a, np.float32), (0, 3, 1, 2))))


def relative_error(ours, reference) -> float:
  """max |ours − reference| / max |reference|: the parity figure the tests bound by 1e-4."""
  ours, reference = np.asarray(ours, np.float64), np.asarray(reference, np.float64)
  assert ours.shape == reference.shape, (ours.shape, reference.shape)
  return float(np.max(np.abs(ours - reference)) / max(np.max(np.abs(reference)), 1e-12))
