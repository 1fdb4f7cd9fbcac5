"""The FID Inception-v3 network in Flax NNX (NHWC), pool3 features [B, 2048].

This is the network of the standard FID: the TensorFlow Inception graph of 2015-12-05
as ported to PyTorch by pytorch-fid (torchvision's Inception3 with the blocks patched by
`FIDInceptionA` / `FIDInceptionC` / `FIDInceptionE_1` / `FIDInceptionE_2`: average
pools that ignore zero padding, and a max pool in the last block's pooling branch).
Features are the 2048-d global average pool after Mixed_7c ("pool3").

Inputs: images [B, H, W, C] in [-1, 1] (C = 1 or 3; grey is repeated to RGB). As in
pytorch-fid they are resized to 299x299 by bilinear interpolation (half-pixel centres,
`align_corners=False`, no antialiasing) and fed in [-1, 1].

Weights: NOTHING downloads. Bring pytorch-fid's weight file
    pt_inception-2015-12-05-6726825d.pth
(https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/pt_inception-2015-12-05-6726825d.pth;
its SHA-256 starts with 6726825d, the torch.hub naming convention) and convert it once,
on any machine with torch:
    python -m ambient_jax.metrics.inception --convert pt_inception-2015-12-05-6726825d.pth \
        --out fid_inception_v3.npz
Then pass the .npz (or the .pth itself when torch is installed) as `weights_path`.
"""

from __future__ import annotations

import hashlib
import os
from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ambient_jax import errors

FID_WEIGHTS_FILENAME = "pt_inception-2015-12-05-6726825d.pth"
FID_WEIGHTS_URL = ("https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
                   + FID_WEIGHTS_FILENAME)
FID_WEIGHTS_SHA256_PREFIX = "6726825d"
FEATURE_DIM = 2048
INPUT_SIZE = 299
BN_EPS = 1e-3


class MissingInceptionWeightsError(errors.UserError, FileNotFoundError):
  """--inception_weights names no file (nothing is ever downloaded)."""


# ----------------------------------------------------------------------------- layers


def _pair(v):
  return (v, v) if isinstance(v, int) else tuple(v)


class BasicConv2d(nnx.Module):
  """Conv (no bias) -> BatchNorm (inference statistics, eps 1e-3) -> ReLU.

  Kernels start at zero (random init of 21.8 M weights costs ~a minute on a small CPU
  and is useless: real weights are always loaded; `eval_shape` gives the architecture).
  """

  def __init__(self, cin: int, cout: int, kernel, stride=1, padding=0, *, rngs: nnx.Rngs):
    kh, kw = _pair(kernel)
    ph, pw = _pair(padding)
    self.conv = nnx.Conv(cin, cout, (kh, kw), strides=_pair(stride),
                         padding=((ph, ph), (pw, pw)), use_bias=False,
                         kernel_init=nnx.initializers.zeros_init(), rngs=rngs)
    self.bn = nnx.BatchNorm(cout, epsilon=BN_EPS, use_running_average=True, rngs=rngs)

  def __call__(self, x):
    return jax.nn.relu(self.bn(self.conv(x)))


def max_pool(x, k=3, stride=2, pad=0):
  return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, k, k, 1), (1, stride, stride, 1),
                               ((0, 0), (pad, pad), (pad, pad), (0, 0)))


def avg_pool_no_pad(x, k=3):
  """3x3 stride-1 'SAME' average pool that divides by the number of real pixels
  (torch count_include_pad=False, TF's average pool)."""
  window, strides, pads = (1, k, k, 1), (1, 1, 1, 1), ((0, 0), (k // 2,) * 2, (k // 2,) * 2, (0, 0))
  total = jax.lax.reduce_window(x, 0.0, jax.lax.add, window, strides, pads)
  ones = jnp.ones((1,) + x.shape[1:3] + (1,), x.dtype)
  count = jax.lax.reduce_window(ones, 0.0, jax.lax.add, window, strides, pads)
  return total / count


class InceptionA(nnx.Module):  # FIDInceptionA

  def __init__(self, cin, pool_features, *, rngs):
    self.branch1x1 = BasicConv2d(cin, 64, 1, rngs=rngs)
    self.branch5x5_1 = BasicConv2d(cin, 48, 1, rngs=rngs)
    self.branch5x5_2 = BasicConv2d(48, 64, 5, padding=2, rngs=rngs)
    self.branch3x3dbl_1 = BasicConv2d(cin, 64, 1, rngs=rngs)
    self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1, rngs=rngs)
    self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, padding=1, rngs=rngs)
    self.branch_pool = BasicConv2d(cin, pool_features, 1, rngs=rngs)

  def __call__(self, x):
    b1 = self.branch1x1(x)
    b5 = self.branch5x5_2(self.branch5x5_1(x))
    b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
    bp = self.branch_pool(avg_pool_no_pad(x))
    return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(nnx.Module):  # torchvision InceptionB (Mixed_6a)

  def __init__(self, cin, *, rngs):
    self.branch3x3 = BasicConv2d(cin, 384, 3, stride=2, rngs=rngs)
    self.branch3x3dbl_1 = BasicConv2d(cin, 64, 1, rngs=rngs)
    self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1, rngs=rngs)
    self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, stride=2, rngs=rngs)

  def __call__(self, x):
    b3 = self.branch3x3(x)
    bd = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
    return jnp.concatenate([b3, bd, max_pool(x)], axis=-1)


class InceptionC(nnx.Module):  # FIDInceptionC

  def __init__(self, cin, c7, *, rngs):
    self.branch1x1 = BasicConv2d(cin, 192, 1, rngs=rngs)
    self.branch7x7_1 = BasicConv2d(cin, c7, 1, rngs=rngs)
    self.branch7x7_2 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3), rngs=rngs)
    self.branch7x7_3 = BasicConv2d(c7, 192, (7, 1), padding=(3, 0), rngs=rngs)
    self.branch7x7dbl_1 = BasicConv2d(cin, c7, 1, rngs=rngs)
    self.branch7x7dbl_2 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0), rngs=rngs)
    self.branch7x7dbl_3 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3), rngs=rngs)
    self.branch7x7dbl_4 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0), rngs=rngs)
    self.branch7x7dbl_5 = BasicConv2d(c7, 192, (1, 7), padding=(0, 3), rngs=rngs)
    self.branch_pool = BasicConv2d(cin, 192, 1, rngs=rngs)

  def __call__(self, x):
    b1 = self.branch1x1(x)
    b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
    bd = x
    for layer in (self.branch7x7dbl_1, self.branch7x7dbl_2, self.branch7x7dbl_3,
                  self.branch7x7dbl_4, self.branch7x7dbl_5):
      bd = layer(bd)
    bp = self.branch_pool(avg_pool_no_pad(x))
    return jnp.concatenate([b1, b7, bd, bp], axis=-1)


class InceptionD(nnx.Module):  # torchvision InceptionD (Mixed_7a)

  def __init__(self, cin, *, rngs):
    self.branch3x3_1 = BasicConv2d(cin, 192, 1, rngs=rngs)
    self.branch3x3_2 = BasicConv2d(192, 320, 3, stride=2, rngs=rngs)
    self.branch7x7x3_1 = BasicConv2d(cin, 192, 1, rngs=rngs)
    self.branch7x7x3_2 = BasicConv2d(192, 192, (1, 7), padding=(0, 3), rngs=rngs)
    self.branch7x7x3_3 = BasicConv2d(192, 192, (7, 1), padding=(3, 0), rngs=rngs)
    self.branch7x7x3_4 = BasicConv2d(192, 192, 3, stride=2, rngs=rngs)

  def __call__(self, x):
    b3 = self.branch3x3_2(self.branch3x3_1(x))
    b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
    return jnp.concatenate([b3, b7, max_pool(x)], axis=-1)


class InceptionE(nnx.Module):  # FIDInceptionE_1 (avg pool) / FIDInceptionE_2 (max pool)

  def __init__(self, cin, pool: str, *, rngs):
    self.pool = pool
    self.branch1x1 = BasicConv2d(cin, 320, 1, rngs=rngs)
    self.branch3x3_1 = BasicConv2d(cin, 384, 1, rngs=rngs)
    self.branch3x3_2a = BasicConv2d(384, 384, (1, 3), padding=(0, 1), rngs=rngs)
    self.branch3x3_2b = BasicConv2d(384, 384, (3, 1), padding=(1, 0), rngs=rngs)
    self.branch3x3dbl_1 = BasicConv2d(cin, 448, 1, rngs=rngs)
    self.branch3x3dbl_2 = BasicConv2d(448, 384, 3, padding=1, rngs=rngs)
    self.branch3x3dbl_3a = BasicConv2d(384, 384, (1, 3), padding=(0, 1), rngs=rngs)
    self.branch3x3dbl_3b = BasicConv2d(384, 384, (3, 1), padding=(1, 0), rngs=rngs)
    self.branch_pool = BasicConv2d(cin, 192, 1, rngs=rngs)

  def __call__(self, x):
    b1 = self.branch1x1(x)
    b3 = self.branch3x3_1(x)
    b3 = jnp.concatenate([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], axis=-1)
    bd = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
    bd = jnp.concatenate([self.branch3x3dbl_3a(bd), self.branch3x3dbl_3b(bd)], axis=-1)
    pooled = avg_pool_no_pad(x) if self.pool == "avg" else max_pool(x, 3, 1, 1)
    return jnp.concatenate([b1, b3, bd, self.branch_pool(pooled)], axis=-1)


def bilinear_matrix(n_in: int, n_out: int) -> np.ndarray:
  """[n_out, n_in] weights of torch's bilinear interpolation with align_corners=False
  (half-pixel centres, source index clamped at 0, no antialiasing when shrinking)."""
  src = np.maximum((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0.0)
  i0 = np.minimum(np.floor(src).astype(np.int64), n_in - 1)
  i1 = np.minimum(i0 + 1, n_in - 1)
  lam = src - i0
  w = np.zeros((n_out, n_in), np.float64)
  np.add.at(w, (np.arange(n_out), i0), 1.0 - lam)
  np.add.at(w, (np.arange(n_out), i1), lam)
  return w.astype(np.float32)


def resize_bilinear(x: jax.Array, size: int = INPUT_SIZE) -> jax.Array:
  """[B, H, W, C] -> [B, size, size, C], as torch F.interpolate(bilinear, align_corners=False).

  Two small matrix products (jax.image.resize antialiases when shrinking, torch does not).
  """
  if x.shape[1:3] == (size, size):
    return x
  wh = jnp.asarray(bilinear_matrix(x.shape[1], size))
  ww = jnp.asarray(bilinear_matrix(x.shape[2], size))
  return jnp.einsum("oh,bhwc,pw->bopc", wh, x, ww, precision=jax.lax.Precision.HIGHEST)


class FIDInceptionV3(nnx.Module):
  """pool3 FID Inception: images [B, H, W, C] in [-1, 1] -> features [B, 2048] float32."""

  def __init__(self, *, rngs: nnx.Rngs = None, resize_input: bool = True):
    rngs = rngs if rngs is not None else nnx.Rngs(0)
    self.resize_input = resize_input
    self.Conv2d_1a_3x3 = BasicConv2d(3, 32, 3, stride=2, rngs=rngs)
    self.Conv2d_2a_3x3 = BasicConv2d(32, 32, 3, rngs=rngs)
    self.Conv2d_2b_3x3 = BasicConv2d(32, 64, 3, padding=1, rngs=rngs)
    self.Conv2d_3b_1x1 = BasicConv2d(64, 80, 1, rngs=rngs)
    self.Conv2d_4a_3x3 = BasicConv2d(80, 192, 3, rngs=rngs)
    self.Mixed_5b = InceptionA(192, 32, rngs=rngs)
    self.Mixed_5c = InceptionA(256, 64, rngs=rngs)
    self.Mixed_5d = InceptionA(288, 64, rngs=rngs)
    self.Mixed_6a = InceptionB(288, rngs=rngs)
    self.Mixed_6b = InceptionC(768, 128, rngs=rngs)
    self.Mixed_6c = InceptionC(768, 160, rngs=rngs)
    self.Mixed_6d = InceptionC(768, 160, rngs=rngs)
    self.Mixed_6e = InceptionC(768, 192, rngs=rngs)
    self.Mixed_7a = InceptionD(768, rngs=rngs)
    self.Mixed_7b = InceptionE(1280, "avg", rngs=rngs)
    self.Mixed_7c = InceptionE(2048, "max", rngs=rngs)

  def __call__(self, images: jax.Array) -> jax.Array:
    x = jnp.asarray(images, jnp.float32)
    if x.ndim != 4 or x.shape[-1] not in (1, 3):
      raise ValueError(f"images must be [B, H, W, 1 or 3] in [-1, 1]; got {x.shape}.")
    if x.shape[-1] == 1:
      x = jnp.repeat(x, 3, axis=-1)
    if self.resize_input:
      x = resize_bilinear(x)
    x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
    x = max_pool(x)
    x = max_pool(self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x)))
    for block in (self.Mixed_5b, self.Mixed_5c, self.Mixed_5d, self.Mixed_6a, self.Mixed_6b,
                  self.Mixed_6c, self.Mixed_6d, self.Mixed_6e, self.Mixed_7a, self.Mixed_7b,
                  self.Mixed_7c):
      x = block(x)
    return jnp.mean(x, axis=(1, 2))


# ----------------------------------------------------------------------------- weights

_BN_NAMES = {"weight": "scale", "bias": "bias", "running_mean": "mean", "running_var": "var"}


def torch_to_flax_name(name: str) -> str | None:
  """pytorch-fid state-dict key -> our flat key ('Mixed_5b/branch1x1/conv/kernel'); None
  for entries the pool3 network does not use (fc, num_batches_tracked)."""
  parts = name.split(".")
  if parts[0] in ("fc", "AuxLogits") or parts[-1] == "num_batches_tracked":
    return None
  if len(parts) < 3 or parts[-2] not in ("conv", "bn"):
    raise ValueError(f"unexpected Inception weight name {name!r}.")
  if parts[-2] == "conv":
    if parts[-1] != "weight":
      raise ValueError(f"unexpected Inception weight name {name!r} (convs have no bias).")
    leaf = "kernel"
  else:
    if parts[-1] not in _BN_NAMES:
      raise ValueError(f"unexpected Inception weight name {name!r}.")
    leaf = _BN_NAMES[parts[-1]]
  return "/".join(parts[:-1] + [leaf])


def convert_state_dict(state_dict: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  """pytorch-fid state dict (numpy values) -> flat {our key: array}; conv OIHW -> HWIO."""
  out = {}
  for name, value in state_dict.items():
    key = torch_to_flax_name(name)
    if key is None:
      continue
    value = np.asarray(value, np.float32)
    if key.endswith("/kernel"):
      value = value.transpose(2, 3, 1, 0)
    out[key] = value
  return out


def flat_state(model: nnx.Module) -> dict[str, jax.Array]:
  """{'Mixed_5b/branch1x1/conv/kernel': array, ...} of every Param and BatchStat."""
  flat = nnx.to_flat_state(nnx.state(model))
  return {"/".join(str(p) for p in path): v for path, v in flat}


def sha256_of(path: str) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 20), b""):
      h.update(chunk)
  return h.hexdigest()


def _missing_message(path) -> str:
  return (f"FID Inception weights not found at {path!r}. Nothing is downloaded. Bring "
          f"pytorch-fid's {FID_WEIGHTS_FILENAME} (from {FID_WEIGHTS_URL}; SHA-256 starts with "
          f"{FID_WEIGHTS_SHA256_PREFIX}) and convert it once, where torch is installed: "
          f"`python -m ambient_jax.metrics.inception --convert {FID_WEIGHTS_FILENAME} "
          f"--out fid_inception_v3.npz`; then pass --inception_weights=fid_inception_v3.npz.")


def load_torch_file(path: str) -> dict[str, np.ndarray]:
  """Reads the .pth (needs torch, only here)."""
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError(f"{path!r} is a PyTorch file and torch is not installed; convert it to "
                      ".npz on a machine with torch (see ambient_jax/metrics/inception.py).") from e
  sd = torch.load(path, map_location="cpu")
  return {k: v.detach().cpu().numpy() for k, v in sd.items()}


def load_weights(model: FIDInceptionV3, weights_path: str | None) -> FIDInceptionV3:
  """Fills `model` from a converted .npz (or a pytorch-fid .pth when torch is present)."""
  if not weights_path or not os.path.exists(weights_path):
    raise MissingInceptionWeightsError(_missing_message(weights_path))
  if weights_path.endswith(".pth"):
    digest = sha256_of(weights_path)
    if not digest.startswith(FID_WEIGHTS_SHA256_PREFIX):
      raise ValueError(f"{weights_path!r} has SHA-256 {digest}, not the FID Inception weights "
                       f"(expected a hash starting with {FID_WEIGHTS_SHA256_PREFIX}).")
    weights = convert_state_dict(load_torch_file(weights_path))
  else:
    with np.load(weights_path) as f:
      weights = {k: f[k] for k in f.files}
  target = flat_state(model)
  missing = sorted(set(target) - set(weights))
  extra = sorted(set(weights) - set(target))
  if missing or extra:
    raise ValueError(f"{weights_path!r} does not match the FID Inception: "
                     f"{len(missing)} missing (e.g. {missing[:3]}), {len(extra)} unexpected "
                     f"(e.g. {extra[:3]}).")
  flat = nnx.to_flat_state(nnx.state(model))
  for path, var in flat:
    key = "/".join(str(p) for p in path)
    value = weights[key]
    if tuple(value.shape) != tuple(var.shape):
      raise ValueError(f"{key}: weight shape {value.shape} != model shape {var.shape}.")
    var[...] = jnp.asarray(value, jnp.float32)
  nnx.update(model, nnx.from_flat_state(flat))
  return model


def load_fid_inception(weights_path: str | None) -> FIDInceptionV3:
  """The FID Inception with its real weights; raises a clear error when they are missing."""
  if not weights_path or not os.path.exists(weights_path):
    raise MissingInceptionWeightsError(_missing_message(weights_path))
  model = FIDInceptionV3(rngs=nnx.Rngs(0))
  return load_weights(model, weights_path)


def make_feature_fn(model: FIDInceptionV3):
  """A jitted `features(images [B,H,W,C] in [-1,1]) -> [B, 2048]`."""
  graphdef, state = nnx.split(model)

  @jax.jit
  def features(images):
    return nnx.merge(graphdef, state)(images)

  return features


def convert_file(pth_path: str, out_path: str) -> dict[str, np.ndarray]:
  digest = sha256_of(pth_path)
  if not digest.startswith(FID_WEIGHTS_SHA256_PREFIX):
    print(f"WARNING: SHA-256 {digest} does not start with {FID_WEIGHTS_SHA256_PREFIX}; "
          "this is not pytorch-fid's FID Inception file.")
  weights = convert_state_dict(load_torch_file(pth_path))
  np.savez(out_path, **weights)
  print(f"wrote {len(weights)} arrays ({sum(v.size for v in weights.values()):,} numbers) "
        f"to {out_path}; source SHA-256 {digest}")
  return weights


def _convert_main() -> None:
  """`python -m ambient_jax.metrics.inception --convert PTH [--out NPZ]`; a mistake is one line."""
  import argparse  # pylint: disable=g-import-not-at-top
  parser = argparse.ArgumentParser(prog="ambient_jax.metrics.inception",
                                   description="Convert pytorch-fid Inception weights to .npz")
  parser.add_argument("--convert", required=True, help=f"path to {FID_WEIGHTS_FILENAME}")
  parser.add_argument("--out", default="fid_inception_v3.npz")
  args = parser.parse_args()
  if not os.path.isfile(args.convert):
    parser.exit(errors.EXIT_ERROR, f"{parser.prog}: error: --convert={args.convert}: no such file "
                f"(bring {FID_WEIGHTS_FILENAME} from {FID_WEIGHTS_URL}).\n")
  try:
    convert_file(args.convert, args.out)
  except ImportError as e:  # torch is needed here, and only here
    parser.exit(errors.EXIT_ERROR, f"{parser.prog}: error: {e}\n")


if __name__ == "__main__":
  _convert_main()
