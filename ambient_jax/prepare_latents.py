"""Prepares a noisy-latent dataset once per dataset, for latent (SD / SDXL) fine-tuning:

    python -m ambient_jax.prepare_latents --images=DIR --pretrained=SDXL_FOLDER --out=DIR \\
        --resolution=1024 --t_n=500 [--corruption_seed=0] [--batch_size=8]

Each image (png/jpg/jpeg/webp under --images, sorted by path) is resized (shorter side to
the resolution) and center-cropped, encoded by the VAE (one posterior sample) and noised
once at t_n with noise fixed per example; only these noisy latents are written, with each
unique caption's text-encoder states (captions from the folder's Hugging Face imagefolder
`metadata.jsonl`: lines {"file_name": ..., "text": ...}; an image without one gets "").
The format and its reader: ambient_jax/data/latent.py.

The same command again resumes where it stopped (and says so in one line when it is
finished); other arguments on the same --out are an error. With several processes
(--distributed, or --coordinator_address/--num_processes/--process_id) on a shared file
system, process k does the chunks c with c % processes == k.

Exit status: 0 finished (now or before); 2 a mistake on the command line;
1 a missing or unusable folder or file (one line each; --traceback shows the traceback).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import json
import os
import time
from collections.abc import Callable, Sequence
from typing import Any, Optional

from absl import flags
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils

from ambient_jax import cli
from ambient_jax.data.corruption import example_noise, uint8_to_float
from ambient_jax.latent import attention, pipeline, prompts, vae
from ambient_jax.data import latent as ds
from ambient_jax.latent.schedule import NoiseSchedule
from ambient_jax.precond import expand

PROG = "ambient_jax.prepare_latents"
CAPTIONS_FILE = ds.CAPTIONS_FILE
TEXT_LENGTH = 77
# The arguments that define a dataset: the same --out again must have the same ones.
IDENTITY = ("images", "pretrained", "resolution", "t_n", "sigma_n", "corruption_seed",
            "batch_size", "max_examples", "captions_file")


@dataclasses.dataclass(frozen=True)
class Args:
  """What `prepare` makes (the command line's flags). Exactly one of t_n / sigma_n."""
  images: str
  pretrained: str
  out: str
  resolution: int = 1024
  t_n: Optional[int] = None
  sigma_n: Optional[float] = None
  corruption_seed: int = 0
  batch_size: int = 8
  max_examples: int = 0
  captions_file: Optional[str] = None  # None: IMAGES/metadata.jsonl when it exists
  attention: str = "auto"  # the VAE's attention implementation (latent/attention.py)

  def identity(self) -> dict[str, Any]:
    return {k: getattr(self, k) for k in IDENTITY}

  def command(self) -> str:
    parts = [f"--{k}={v}" for k, v in dataclasses.asdict(self).items()
             if v is not None and not (k == "max_examples" and v == 0)]
    return f"python -m {PROG} " + " ".join(parts)


# ----------------------------------------------------------------------------- inputs


def _read_json(path: str) -> dict:
  try:
    with open(path) as f:
      return json.load(f)
  except FileNotFoundError as e:
    raise cli.UserError(f"{path} does not exist (--pretrained must be a diffusers folder, as "
                        "save_pretrained writes it).") from e
  except ValueError as e:
    raise cli.UserError(f"{path} is not valid JSON ({e}).") from e


def read_pretrained_configs(folder: str) -> dict[str, Any]:
  """The config dicts of a diffusers SD / SDXL folder that preparation needs, read without
  loading any weights: model_index, vae, text_encoder[_2], scheduler."""
  if not os.path.isdir(folder):
    raise cli.UserError(f"--pretrained={folder}: no such folder (give a diffusers SD / SDXL "
                        "folder with model_index.json).")
  configs = {"model_index": _read_json(os.path.join(folder, "model_index.json"))}
  index = configs["model_index"]
  sdxl = bool(index.get("text_encoder_2") and index["text_encoder_2"][0])
  for name in ("vae", "text_encoder") + (("text_encoder_2",) if sdxl else ()):
    configs[name] = _read_json(os.path.join(folder, name, "config.json"))
  configs["scheduler"] = _read_json(os.path.join(folder, "scheduler", "scheduler_config.json"))
  return configs


def load_components(folder: str, attention: str = "auto"):
  """`pipeline.load_pretrained(folder, with_unet=False)` (VAE, text encoders, tokenizers,
  schedule) after `read_pretrained_configs` checked the folder; a missing component
  folder is one line."""
  read_pretrained_configs(folder)
  try:
    return pipeline.load_pretrained(folder, with_unet=False, attention=attention)
  except FileNotFoundError as e:
    raise cli.UserError(f"--pretrained={folder}: {e}") from e


def noise_level(args: Args, configs: dict) -> float:
  """VP σ_n of the run: √(1 − ᾱ_{t_n}) of the scheduler (t_n = 0: clean, 0), or --sigma_n."""
  if args.t_n is None:
    return float(args.sigma_n)
  schedule = NoiseSchedule.from_config(configs["scheduler"])
  if not 0 <= args.t_n < schedule.num_train_timesteps:
    raise cli.UsageError(f"--t_n={args.t_n} is out of range: the scheduler has DDPM steps "
                         f"0..{schedule.num_train_timesteps - 1} (0 = clean).")
  return 0.0 if args.t_n == 0 else float(schedule.vp_sigmas[args.t_n])


def check_args(args: Args) -> None:
  """The command-line mistakes that need no file: one UsageError each."""
  for name in ("images", "pretrained", "out"):
    if not getattr(args, name):
      raise cli.UsageError(f"--{name} is required.")
  if (args.t_n is None) == (args.sigma_n is None):
    raise cli.UsageError("give exactly one of --t_n (DDPM step of the corruption, e.g. 500) and "
                         "--sigma_n (its VP noise level in [0, 1), e.g. 0.851).")
  if args.sigma_n is not None and not 0 <= args.sigma_n < 1:
    raise cli.UsageError(f"--sigma_n={args.sigma_n}: a VP noise level must be in [0, 1).")
  for name, low in (("resolution", 1), ("batch_size", 1), ("max_examples", 0)):
    if getattr(args, name) < low:
      raise cli.UsageError(f"--{name}={getattr(args, name)} must be at least {low}.")
  if not os.path.isdir(args.images):
    raise cli.UserError(f"--images={args.images}: no such folder.")
  if os.path.exists(args.out) and not os.path.isdir(args.out):
    raise cli.UserError(f"--out={args.out} exists and is not a folder.")


def build_meta(args: Args, configs: dict) -> dict[str, Any]:
  """meta.json of the dataset `args` describes (before any example is written)."""
  file_names = ds.list_images(args.images)
  if args.max_examples:
    file_names = file_names[:args.max_examples]
  if not file_names:
    raise cli.UserError(f"--images={args.images}: no images (.png, .jpg, .jpeg, .webp) found.")
  captions, captions_path = ds.read_captions(args.images, file_names, args.captions_file)
  sdxl = "text_encoder_2" in configs
  vae_config = vae.vae_config(configs["vae"])
  f = 2 ** (len(vae_config["block_out_channels"]) - 1)
  if args.resolution % f:
    raise cli.UsageError(f"--resolution={args.resolution} must be a multiple of {f}, the VAE's "
                         "downsampling factor.")
  encoders = [configs[n] for n in ("text_encoder", "text_encoder_2") if n in configs]
  prompts = list(dict.fromkeys(captions))  # unique, in order of first appearance
  side = args.resolution // f
  return {
      "format": ds.FORMAT, "version": ds.VERSION, "complete": False,
      "pretrained": args.pretrained, "family": "sdxl" if sdxl else "sd",
      "resolution": args.resolution, "t_n": args.t_n, "sigma_n": noise_level(args, configs),
      "corruption_seed": args.corruption_seed, "num_examples": len(file_names),
      "latent_shape": [side, side, int(vae_config["latent_channels"])],
      "num_prompts": len(prompts), "chunk_size": args.batch_size,
      "context_dim": sum(int(c["hidden_size"]) for c in encoders),
      "pooled_dim": int(encoders[-1]["projection_dim"]) if sdxl else None,
      "uncond": "zeros" if _zero_uncond(configs) else "empty prompt",
      "vae_scaling_factor": float(vae_config["scaling_factor"]),
      "vae_shift_factor": float(vae_config["shift_factor"] or 0.0),
      "scheduler": configs["scheduler"], "image_folder": args.images,
      "captions_file": captions_path, "file_names": file_names, "captions": captions,
      "prompts": prompts, "args": args.identity(), "command": args.command(),
  }


def _zero_uncond(configs: dict) -> bool:
  """SDXL base drops the prompt as zeros (model_index force_zeros_for_empty_prompt, as
  `pipeline.encode_prompts`); every other model as the encoding of ""."""
  return "text_encoder_2" in configs and bool(
      configs["model_index"].get("force_zeros_for_empty_prompt", True))


def check_same_dataset(existing: dict, meta: dict, out: str) -> None:
  """A re-run on the same --out must describe the same dataset (UsageError otherwise)."""
  old, new = existing.get("args", {}), meta["args"]
  for key in IDENTITY:
    if old.get(key) != new.get(key):
      raise cli.UsageError(
          f"--out={out} was started with --{key}={old.get(key)}, this run has --{key}="
          f"{new.get(key)}: re-run with the original arguments to resume "
          f"({existing.get('command')}), or choose a new --out.")
  for key in ("file_names", "captions", "pretrained", "num_prompts", "latent_shape"):
    if existing.get(key) != meta[key]:
      raise cli.UserError(f"--out={out}: {key} changed since this dataset was started (the image "
                          f"folder, captions or pretrained folder were edited); use a new --out.")


# ----------------------------------------------------------------------------- files


def _write_json(path: str, value: Any) -> None:
  """Atomic: a reader sees the old or the new file, never half of one."""
  tmp = f"{path}.tmp{os.getpid()}"
  with open(tmp, "w") as f:
    json.dump(value, f, indent=1)
  os.replace(tmp, path)


def create_files(out: str, meta: dict, sigma_n, prompt_index) -> None:
  """Preallocates every array file (sparse on most file systems), writes the per-example
  tables known up front, then meta.json (complete: false)."""
  os.makedirs(out, exist_ok=True)
  for name, shape in ds.array_shapes(meta).items():
    array = np.lib.format.open_memmap(os.path.join(out, name + ".npy"), mode="w+",
                                      dtype=ds.ARRAYS[name], shape=shape)
    if name == "sigma_n":
      array[:] = sigma_n
    elif name == "prompt_index":
      array[:] = prompt_index
    array.flush()
    del array
  _write_json(os.path.join(out, ds.META), meta)


class RowWriter:
  """Writes rows of one preallocated .npy file with pwrite at their exact byte offsets.

  Not a writable memory map: a map writes back whole pages, and on a file system shared by
  several hosts a page that straddles two processes' chunks would lose one side's rows.
  """

  def __init__(self, path: str):
    view = np.load(path, mmap_mode="r")
    self.dtype, self.shape, self.offset = view.dtype, view.shape, view.offset
    self.row_bytes = int(np.prod(view.shape[1:], dtype=np.int64)) * view.dtype.itemsize
    del view
    self.fd = os.open(path, os.O_RDWR)

  def write(self, start: int, rows) -> None:
    """rows [k, *shape[1:]] (cast to the file's dtype) into rows start..start+k−1."""
    data = np.ascontiguousarray(np.broadcast_to(np.asarray(rows, self.dtype),
                                                (len(rows), *self.shape[1:]))).tobytes()
    os.pwrite(self.fd, data, self.offset + start * self.row_bytes)

  def sync(self) -> None:
    os.fsync(self.fd)

  def close(self) -> None:
    os.close(self.fd)


def _open_writers(out: str, meta: dict) -> dict[str, RowWriter]:
  return {name: RowWriter(os.path.join(out, name + ".npy")) for name in ds.array_shapes(meta)}


# ----------------------------------------------------------------------------- compute


@functools.partial(jax.jit, static_argnums=0)
def _noisy_latents(graphdef, state, images, indices, sigma_n, posterior_key, noise_key):
  """images uint8 [B, R, R, 3], indices [B], σ_n [B] -> x_n [B, h, w, C] float32: example i's
  VAE posterior sample from fold_in(posterior_key, i) (drawn as vae.to_latents(image[None],
  key) would), scaled, noised with example_noise(i) of noise_key."""
  vae_module = nnx.merge(graphdef, state)
  mean, logvar = vae_module.encode(uint8_to_float(images))
  keys = jax.vmap(lambda i: jax.random.fold_in(posterior_key, i))(indices.astype(jnp.uint32))
  sample = jax.vmap(lambda m, v, k: vae_module.sample_posterior(m[None], v[None], k)[0])(
      mean, logvar, keys)
  z0 = ((sample - vae_module.shift_factor) * vae_module.scaling_factor).astype(jnp.float32)
  s = expand(sigma_n, z0)
  return jnp.sqrt(1.0 - jnp.square(s)) * z0 + s * example_noise(indices, z0.shape[1:], noise_key)


@functools.partial(jax.jit, static_argnums=0)
def _text_states(graphdef, state, *ids):
  """ids [B, 77] per tokenizer -> (context [B, 77, D], pooled [B, Dp] or None), as
  `pipeline.LatentPipeline.encode_text`."""
  encoders = nnx.merge(graphdef, state)
  if len(encoders) == 1:
    return prompts.encode_prompt_sd(ids[0], encoders[0]), None
  return prompts.encode_prompt_sdxl(*ids, *encoders)


def make_encoders(pipe, seed: int) -> tuple[Callable, Callable]:
  """latents(images, indices, σ_n) -> x_n and text(*ids) -> (context, pooled) of `pipe`,
  jitted once per batch shape (and model structure: a second run in the same process
  reuses the compiled code)."""
  vae_def, vae_state = nnx.split(pipe.vae)
  text_def, text_state = nnx.split(pipe.text_encoders)
  keys = jax.random.key(seed ^ ds.POSTERIOR_SALT), jax.random.key(seed)
  return (lambda images, indices, sigma_n: _noisy_latents(vae_def, vae_state, images, indices,
                                                          sigma_n, *keys),
          lambda *ids: _text_states(text_def, text_state, *ids))


def _pad(rows: list, size: int) -> list:
  """rows + copies of the last row up to `size` (the last batch keeps the compiled shape)."""
  return rows + [rows[-1]] * (size - len(rows))


def _chunks(total: int, size: int) -> list[range]:
  return [range(s, min(s + size, total)) for s in range(0, total, size)]


class _Progress:
  """Examples done / total, examples/s and ETA: a line after the first chunk (which
  includes compiling), then at most one every `every` seconds, and at the end. The rate
  counts from the end of the first chunk."""

  def __init__(self, total: int, before: int, todo: int, log: Callable[[str], None],
               every: float = 15.0):
    self.total, self.before, self.todo, self.log, self.every = total, before, todo, log, every
    self.start = self.last = time.time()
    self.here = self.first = 0

  def update(self, examples: int) -> None:
    self.here += examples
    if not self.first:
      self.first, self.start = examples, time.time()
      self.report()
    elif time.time() - self.last >= self.every:
      self.report()

  def report(self) -> None:
    self.last = time.time()
    done = self.before + self.here
    line = f"{done}/{self.total} examples ({100 * done / self.total:.1f} %)"
    if self.here > self.first:
      rate = (self.here - self.first) / max(self.last - self.start, 1e-9)
      eta = time.strftime("%H:%M:%S", time.gmtime(min((self.todo - self.here) / rate, 359999)))
      line += f", {rate:.1f} examples/s, ETA {eta}"
    self.log(line)


def prepare(args: Args, *, stop_after_chunks: Optional[int] = None,
            log: Callable[[str], None] = print) -> str:
  """Writes (or resumes, or finds finished) the dataset `args` describes; returns --out.

  `stop_after_chunks`: return after that many chunks of this process (tests of resume).
  """
  check_args(args)
  args = dataclasses.replace(args, images=os.path.abspath(args.images),
                             pretrained=os.path.abspath(args.pretrained),
                             out=os.path.abspath(args.out))
  meta = build_meta(args, read_pretrained_configs(args.pretrained))
  out, rank, count = args.out, jax.process_index(), jax.process_count()
  say = lambda msg: log(f"[{PROG}{f' {rank}/{count}' if count > 1 else ''}] {msg}")
  barrier = lambda name: count > 1 and multihost_utils.sync_global_devices(f"{PROG}:{name}")
  existing = ds.read_meta(out) if os.path.isfile(os.path.join(out, ds.META)) else None
  if existing is not None:
    check_same_dataset(existing, meta, out)
    if existing.get("complete"):
      say(f"{out} is already complete ({meta['num_examples']} examples); nothing to do.")
      return out
  if existing is None and rank == 0:
    lookup = {p: k for k, p in enumerate(meta["prompts"])}
    create_files(out, meta, np.full((meta["num_examples"],), meta["sigma_n"], np.float32),
                 np.asarray([lookup[c] for c in meta["captions"]], np.int32))
  barrier("created")
  chunks = {"prompt_chunks": _chunks(meta["num_prompts"], args.batch_size),
            "latent_chunks": _chunks(meta["num_examples"], args.batch_size)}
  done = ds.read_progress(out)
  todo = [(kind, c) for kind in chunks for c in range(len(chunks[kind]))
          if c % count == rank and c not in done[kind]]
  before = ds.examples_done(meta, done["latent_chunks"])
  say(f"{meta['num_examples']} images ({meta['num_prompts']} unique captions) at "
      f"{args.resolution}² -> latents {tuple(meta['latent_shape'])}, VP σ_n "
      f"{meta['sigma_n']:.4f}{f' (t_n {args.t_n})' if args.t_n is not None else ''}; "
      f"{before} examples done before; {len(todo)} chunks to do here.")
  if todo:
    progress_file = os.path.join(out, "progress.json" if count == 1 else f"progress.{rank}.json")
    todo_examples = sum(len(chunks[kind][c]) for kind, c in todo if kind == "latent_chunks")
    worker = _Worker(args, meta, chunks, _open_writers(out, meta), progress_file, done,
                     _Progress(meta["num_examples"], before, todo_examples, say) if count == 1
                     else _Progress(todo_examples, 0, todo_examples,
                                    lambda m: say(f"this process's share: {m}")))
    processed = worker.run(todo[:stop_after_chunks])
    if processed < len(todo):
      say(f"stopped after {processed} chunks, as asked; the same command resumes.")
      return out
  barrier("finished")
  if rank == 0:
    _complete(out, meta, chunks, say)
  barrier("completed")
  return out


class _Worker:
  """Does this process's chunks: prompt chunks (text encoders) and latent chunks (read,
  resize, VAE, noise), each written with its rows and then recorded in the progress file.

  Images are read by a thread pool two chunks ahead, and a chunk's latents are copied off
  the device after the next chunk is dispatched, so reading, computing and writing overlap.
  """

  def __init__(self, args: Args, meta: dict, chunks: dict, writers: dict, progress_file: str,
               done: dict, progress: _Progress):
    self.args, self.meta, self.chunks, self.writers = args, meta, chunks, writers
    self.progress_file, self.progress = progress_file, progress
    self.record = {k: sorted(v) for k, v in done.items()}
    self.pipe = load_components(args.pretrained, args.attention)
    self.encode_latents, self.encode_text = make_encoders(self.pipe, meta["corruption_seed"])
    self.pool = concurrent.futures.ThreadPoolExecutor(max(1, min(16, os.cpu_count() or 1)))

  def run(self, todo: list[tuple[str, int]]) -> int:
    """Does `todo` [(kind, chunk)], returns how many were done."""
    own = [c for kind, c in todo if kind == "latent_chunks"]
    loading = {c: self._load(c) for c in own[:2]}
    pending = None  # (chunk, x_n still on the device)
    for kind, c in todo:
      if kind == "prompt_chunks":
        self._prompts(c)
        continue
      position = own.index(c)
      if position + 2 < len(own):
        loading[own[position + 2]] = self._load(own[position + 2])
      dispatched = self._latents(c, [f.result() for f in loading.pop(c)])
      if pending is not None:
        self._write_latents(*pending)
      pending = dispatched
    if pending is not None:
      self._write_latents(*pending)
      self.progress.report()
    self.pool.shutdown(wait=False, cancel_futures=True)
    for writer in self.writers.values():
      writer.close()
    return len(todo)

  def _load(self, c: int) -> list:
    folder, names, size = self.args.images, self.meta["file_names"], self.args.resolution
    return [self.pool.submit(ds.load_image, os.path.join(folder, names[i]), size)
            for i in self.chunks["latent_chunks"][c]]

  def _finish(self, kind: str, c: int) -> None:
    """Chunk c's rows are on disk: record it (atomically) so a resume skips it."""
    for writer in self.writers.values():
      writer.sync()
    self.record[kind] = sorted(set(self.record[kind]) | {c})
    _write_json(self.progress_file, self.record)

  def _text(self, texts: list[str]):
    """context [k, 77, D] and pooled [k, Dp] (or None) of k ≤ batch_size texts."""
    ids = [np.asarray(tok(_pad(texts, self.args.batch_size))) for tok in self.pipe.tokenizers]
    context, pooled = self.encode_text(*ids)
    return (np.asarray(context)[:len(texts)],
            None if pooled is None else np.asarray(pooled)[:len(texts)])

  def _prompts(self, c: int) -> None:
    rows = self.chunks["prompt_chunks"][c]
    context, pooled = self._text([self.meta["prompts"][p] for p in rows])
    self.writers["context"].write(rows.start, context)
    if pooled is not None:
      self.writers["text_embeds"].write(rows.start, pooled)
    if c == 0:  # the dropped prompt of classifier-free guidance, once
      context, pooled = self._text([""])
      zero = self.meta["uncond"] == "zeros"
      self.writers["uncond_context"].write(0, 0 * context[0] if zero else context[0])
      if pooled is not None:
        self.writers["uncond_text_embeds"].write(0, 0 * pooled[0] if zero else pooled[0])
    self._finish("prompt_chunks", c)

  def _latents(self, c: int, loaded: list) -> tuple:
    """Dispatches chunk c's VAE encode + noise (padded to batch_size); writes its time ids."""
    rows, size = self.chunks["latent_chunks"][c], self.args.batch_size
    indices = np.asarray(_pad(list(rows), size), np.int32)
    images = np.stack(_pad([image for image, _, _ in loaded], size))
    x_n = self.encode_latents(images, indices, np.full((size,), self.meta["sigma_n"], np.float32))
    if self.meta["family"] == "sdxl":
      r = self.args.resolution
      self.writers["time_ids"].write(rows.start, [(*hw, *crop, r, r) for _, hw, crop in loaded])
    return c, x_n

  def _write_latents(self, c: int, x_n) -> None:
    rows = self.chunks["latent_chunks"][c]
    self.writers["latents"].write(rows.start, np.asarray(x_n)[:len(rows)])
    self._finish("latent_chunks", c)
    self.progress.update(len(rows))


def _complete(out: str, meta: dict, chunks: dict, say: Callable[[str], None]) -> None:
  """Marks the dataset complete when every chunk of every process is recorded."""
  done = ds.read_progress(out)
  missing = sum(len(chunks[kind]) - len(done[kind]) for kind in chunks)
  if missing:
    say(f"{missing} chunks are not done (a process stopped?); the same command resumes.")
    return
  _write_json(os.path.join(out, ds.META), {**meta, "complete": True})
  say(f"finished: {out} holds {meta['num_examples']} noisy latents.")


# ----------------------------------------------------------------------------- command line


def main(argv: Sequence[str]) -> int:
  if len(argv) > 1:
    raise cli.UsageError(f"unexpected arguments {argv[1:]}: flags are written --name=value.")
  f = flags.FLAGS
  from ambient_jax.runtime import sharding  # pylint: disable=g-import-not-at-top
  try:
    attention.resolve_implementation(f.attention)
  except ValueError as e:
    raise cli.UsageError(f"--attention={f.attention}: {e}") from e
  sharding.initialize_distributed(f.coordinator_address, f.num_processes, f.process_id,
                                  auto=f.distributed)
  prepare(Args(images=f.images, pretrained=f.pretrained, out=f.out, resolution=f.resolution,
               t_n=f.t_n, sigma_n=f.sigma_n, corruption_seed=f.corruption_seed,
               batch_size=f.batch_size, max_examples=f.max_examples,
               captions_file=f.captions_file or None, attention=f.attention))
  return 0


def _define_flags() -> None:
  flags.DEFINE_string("images", None, "Folder of images (png/jpg/jpeg/webp, sorted by path).",
                      required=True)
  flags.DEFINE_string("pretrained", None, "The diffusers SD / SDXL folder (model_index.json).",
                      required=True)
  flags.DEFINE_string("out", None, "Output folder of the prepared dataset (the same again "
                      "resumes).", required=True)
  flags.DEFINE_integer("resolution", 1024, "Square training resolution in pixels: shorter side "
                       "resized to it, then center-cropped.")
  flags.DEFINE_integer("t_n", None, "Corruption level as a DDPM step (SDXL: 100/500/800 ↔ VP σ_n "
                       "0.325/0.851/0.981; 0 = clean). Exactly one of --t_n, --sigma_n.")
  flags.DEFINE_float("sigma_n", None, "Corruption level as a VP noise level in [0, 1).")
  flags.DEFINE_integer("corruption_seed", 0, "Seed of the fixed per-example VAE sample and noise.")
  flags.DEFINE_integer("batch_size", 8, "Images per VAE call; also the chunk of resume.")
  flags.DEFINE_integer("max_examples", 0, "Only the first N images (sorted); 0 = all.")
  flags.DEFINE_string("captions_file", "", f"JSON lines {{\"file_name\", \"text\"}} (relative to "
                      f"--images); default {CAPTIONS_FILE} there, if present.")
  flags.DEFINE_enum("attention", "auto", attention.ATTENTION_IMPLEMENTATIONS,
                    "The VAE's attention (16,384 tokens at 1024²): auto = cudnn on GPU, pallas "
                    "on TPU, chunked (memory-efficient, pure JAX) elsewhere; xla = plain "
                    "einsum + softmax. The latents do not depend on it (up to rounding).")
  flags.DEFINE_bool("distributed", False, "jax.distributed.initialize() with auto-detection.")
  flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (multi-process).")
  flags.DEFINE_integer("num_processes", None, "With --coordinator_address.")
  flags.DEFINE_integer("process_id", None, "With --coordinator_address.")


if __name__ == "__main__":
  _define_flags()
  cli.run(main, PROG)
