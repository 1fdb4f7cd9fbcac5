"""Whole-config validation, run before anything is built or compiled.

`validate(config, num_devices)` raises one `ConfigError` listing every bad field as
`config.FIELD = VALUE is not allowed: WHAT IS ALLOWED`. The schema is
configs/default.py's `base_config()`: an unknown field (a typo in a config file) is an
error too. Model fields are checked by `ambient_jax.models.resolve_config`, loss options
against the signatures of `losses.ambient_loss` / `losses.consistency_loss`.
"""

from __future__ import annotations

import inspect
import math
import numbers
from typing import Any, Optional

import ml_collections

from ambient_jax import errors
from ambient_jax.training import config_catalog
from ambient_jax.runtime import cpu_defaults

MODES = ("ambient", "naive")
SOURCES = ("memory", "random_access")
FILE_FORMATS = ("tfrecord", "array_record")
_FREE_FORM = ("model", "loss.ambient", "consistency.kwargs")  # checked elsewhere


class ConfigError(errors.UsageError):
  """One or more config fields are invalid; the message names each of them, one a line."""

  @classmethod
  def of(cls, errors: list[str]) -> "ConfigError":
    """One error: its line alone; several: a count, then one indented line each."""
    if len(errors) == 1:
      return cls(errors[0])
    return cls(f"{len(errors)} config fields are invalid:\n  " + "\n  ".join(errors))


def _schema() -> Optional[ml_collections.ConfigDict]:
  """configs/default.py's base_config(), or None outside a source checkout."""
  path = config_catalog.CONFIGS_DIR / "default.py"
  if not path.exists():
    return None
  return config_catalog.load_module(path, "ambient_jax_configs_default_schema").base_config()


def _is_int(v) -> bool:
  return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _is_num(v) -> bool:
  return isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(float(v))


class _Checker:

  def __init__(self, config):
    self.config, self.errors = config, []

  def get(self, path: str):
    node = self.config
    for part in path.split("."):
      node = node[part]
    return node

  def fail(self, path: str, value: Any, allowed: str) -> None:
    self.errors.append(f"config.{path} = {value!r} is not allowed: {allowed}.")

  def int_at_least(self, path: str, minimum: int) -> Optional[int]:
    v = self.get(path)
    if not _is_int(v) or v < minimum:
      self.fail(path, v, f"must be an integer >= {minimum}")
      return None
    return int(v)

  def number(self, path: str, low: float = -math.inf, high: float = math.inf, *,
             low_open: bool = False, high_open: bool = False) -> Optional[float]:
    v = self.get(path)
    ok = _is_num(v) and (v > low if low_open else v >= low) and (v < high if high_open else v <= high)
    if not ok:
      lo = f"{'(' if low_open else '['}{low}" if low != -math.inf else "(-inf"
      hi = f"{high}{')' if high_open else ']'}" if high != math.inf else "inf)"
      self.fail(path, v, f"must be a finite number in {lo}, {hi}")
      return None
    return float(v)

  def one_of(self, path: str, allowed) -> Any:
    v = self.get(path)
    if v not in allowed:
      self.fail(path, v, f"must be one of {tuple(allowed)}")
      return None
    return v

  def unknown_fields(self, node, schema, prefix: str = "") -> None:
    for key in node.keys():
      path = f"{prefix}{key}"
      if path in _FREE_FORM:
        continue
      if key not in schema:
        self.errors.append(f"config.{path} is not a known field; allowed fields here: "
                           f"{sorted(schema.keys())}.")
      elif isinstance(schema[key], ml_collections.ConfigDict):
        if isinstance(node[key], ml_collections.ConfigDict):
          self.unknown_fields(node[key], schema[key], path + ".")
        else:
          self.fail(path, node[key], "must be a section (ConfigDict)")
    for key in schema.keys():
      if key not in node and f"{prefix}{key}" not in _FREE_FORM:
        self.errors.append(f"config.{prefix}{key} is missing (see configs/default.py).")


def _kwargs_of(fn, skip: int) -> set[str]:
  """The keyword options of a loss that a config can set (not its callables, `*_fn`)."""
  params = list(inspect.signature(fn).parameters.values())[skip:]
  return {p.name for p in params
          if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD) and not p.name.endswith("_fn")}


def _check_pixel_data_and_model(c: "_Checker", config) -> None:
  """config.data and config.model of a pixel-space run."""
  from ambient_jax.data import registry  # pylint: disable=g-import-not-at-top
  from ambient_jax.models import registry as model_registry  # pylint: disable=g-import-not-at-top
  # data
  spec = None
  name = c.get("data.name")
  if name not in registry.DATASETS:
    c.fail("data.name", name, f"must be one of the known datasets {sorted(registry.DATASETS)}")
  else:
    spec = registry.DATASETS[name]
  resolution = c.int_at_least("data.resolution", 1)
  c.int_at_least("data.max_examples", 0)
  c.one_of("data.source", SOURCES)
  c.one_of("data.file_format", FILE_FORMATS)
  if c.get("data.source") == "random_access" and c.get("data.file_format") != "array_record":
    c.fail("data.file_format", c.get("data.file_format"),
           "must be 'array_record' when data.source='random_access'")
  levels = c.get("data.sigma_n")
  level_list = list(levels) if isinstance(levels, (tuple, list)) else [levels]
  if not level_list or not all(_is_num(s) and s >= 0 for s in level_list):
    c.fail("data.sigma_n", levels, "must be a number >= 0 or a non-empty tuple of them "
           "(0 = clean; in [-1, 1] pixel units)")
  weights = tuple(c.get("data.sigma_n_weights"))
  if weights and (len(weights) != len(level_list) or not all(_is_num(w) and w > 0 for w in weights)):
    c.fail("data.sigma_n_weights", weights, f"must be empty (equal shares) or {len(level_list)} "
           "positive numbers, one per data.sigma_n level")
  c.number("data.clean_fraction", 0.0, 1.0)
  c.int_at_least("data.corruption_seed", 0)
  if spec is not None and spec.source == "manual" and spec.tfds_name.startswith("ambient_manual"):
    pass  # manual_dir is only needed when the dataset is not prepared yet; checked at load.

  # model
  model_cfg = None
  try:
    model_cfg = model_registry.resolve_config(config.model, prefix="config.model.")
  except ValueError as e:
    c.errors.append(str(e).rstrip(".") + ".")
  if model_cfg is not None and spec is not None and resolution is not None:
    if model_cfg["name"] == "mlp":
      want = resolution * resolution * spec.channels
      if model_cfg["data_dim"] != want:
        c.fail("model.data_dim", model_cfg["data_dim"], f"must be resolution² × channels = {want} "
               "(the MLP sees flattened images)")
    else:
      if model_cfg["img_resolution"] != resolution:
        c.fail("model.img_resolution", model_cfg["img_resolution"],
               f"must equal config.data.resolution = {resolution}")
      if model_cfg["in_channels"] != spec.channels:
        c.fail("model.in_channels", model_cfg["in_channels"],
               f"must equal the channels of {name} ({spec.channels})")
    if model_cfg["label_dim"] not in (0, spec.num_classes):
      c.fail("model.label_dim", model_cfg["label_dim"],
             f"must be 0 (unconditional) or the number of classes of {name} ({spec.num_classes})")


def _check_attention(c: "_Checker") -> None:
  """config.latent.attention: one of ATTENTION_IMPLEMENTATIONS, and one this backend runs."""
  import jax  # pylint: disable=g-import-not-at-top
  from ambient_jax.latent import attention  # pylint: disable=g-import-not-at-top
  name = c.one_of("latent.attention", attention.ATTENTION_IMPLEMENTATIONS)
  if name is not None:
    try:
      attention.resolve_implementation(name, jax.default_backend())
    except ValueError as e:
      c.fail("latent.attention", name, str(e).split(", use ")[0].replace(
          f"attention implementation {name!r} needs", "needs") + "; use 'auto', 'chunked' or 'xla'")


def _check_latent(c: "_Checker") -> None:
  """config.latent of a latent fine-tuning run (the folders themselves are checked when
  the run opens them, with messages naming them)."""
  c.int_at_least("latent.lora_rank", 0)
  c.number("latent.lora_alpha", 0.0)
  targets = c.get("latent.lora_targets")
  if (isinstance(targets, str) or not all(isinstance(t, str) and t for t in targets)
      or not len(targets)):
    c.fail("latent.lora_targets", targets, "must be a non-empty tuple of module names, e.g. "
           "('to_q', 'to_k', 'to_v', 'to_out.0')")
  for field in ("latent.param_dtype", "latent.dtype"):
    c.one_of(field, ("float32", "bfloat16"))
  c.one_of("latent.timesteps", ("uniform", "lognormal"))
  c.one_of("latent.remat", (True, False))
  c.one_of("latent.scan_layers", (True, False))
  _check_attention(c)
  c.number("latent.cfg_dropout", 0.0, 1.0, high_open=True)
  c.number("latent.guidance_scale", 0.0)
  c.int_at_least("latent.sample_steps", 1)
  if not c.get("latent.dataset"):
    c.fail("latent.dataset", c.get("latent.dataset"), "must name a dataset prepared by "
           "`python -m ambient_jax.prepare_latents` (--config.latent.dataset=DIR)")


def validate(config: ml_collections.ConfigDict, num_devices: Optional[int] = None) -> None:
  """Raises ConfigError naming every invalid field. `num_devices` defaults to jax.device_count()."""
  from ambient_jax import losses, sampling  # pylint: disable=g-import-not-at-top

  c = _Checker(config)
  schema = _schema()
  if schema is not None:
    c.unknown_fields(config, schema)
  if c.errors:  # the rest assumes the fields exist
    raise ConfigError.of(c.errors)

  c.int_at_least("seed", 0)
  steps = c.int_at_least("num_train_steps", 1)
  batch = c.int_at_least("batch_size", 1)

  latent = bool(config.get("latent") is not None and config.latent.pretrained)
  if latent:
    _check_latent(c)
  else:
    _check_pixel_data_and_model(c, config)

  # losses
  kind = c.one_of("loss.kind", MODES)
  allowed = _kwargs_of(losses.ambient_loss, 4)
  for key in config.loss.ambient.keys():
    if key not in allowed:
      c.fail(f"loss.ambient.{key}", config.loss.ambient[key],
             f"is not an option of losses.ambient_loss; allowed: {sorted(allowed)}")
  weight = c.number("consistency.weight", 0.0)
  c.int_at_least("consistency.start_step", 0)
  fraction = c.number("consistency.batch_fraction", 0.0, 1.0)
  below = c.one_of("consistency.loss", tuple(losses.BELOW_SIGMA_N_LOSSES))
  if below is not None:
    allowed = _kwargs_of(losses.BELOW_SIGMA_N_LOSSES[below], 4)
    for key in config.consistency.kwargs.keys():  # unset (None) ones are left to the loss
      if key not in allowed and config.consistency.kwargs[key] is not None:
        c.fail(f"consistency.kwargs.{key}", config.consistency.kwargs[key],
               f"is not an option of losses.{losses.BELOW_SIGMA_N_LOSSES[below].__name__}; "
               f"allowed: {sorted(allowed)}")
    step = config.consistency.kwargs.get("step")
    if step is not None and step not in sampling.STEP_KINDS:
      c.fail("consistency.kwargs.step", step, f"must be one of {sampling.STEP_KINDS} (or unset: "
             f"the loss's own default)")
    anchor = config.consistency.kwargs.get("anchor")
    if anchor is not None and anchor not in losses.CONSISTENCY_ANCHORS:
      c.fail("consistency.kwargs.anchor", anchor, f"must be one of {losses.CONSISTENCY_ANCHORS}")
  accum = c.int_at_least("optim.grad_accum_steps", 1)
  from ambient_jax.training import step as step_lib  # pylint: disable=g-import-not-at-top
  accum_loop = config.optim.get("grad_accum_loop", "auto")
  if accum_loop not in step_lib.GRAD_ACCUM_LOOPS:
    c.fail("optim.grad_accum_loop", accum_loop, f"must be one of {step_lib.GRAD_ACCUM_LOOPS} "
           "(how the micro-batches run: one lax.scan, or traced one after the other)")
  if weight and fraction is not None and batch is not None:
    k = batch * fraction
    if fraction == 0 or abs(k - round(k)) > 1e-6 or batch % round(k):
      c.fail("consistency.batch_fraction", fraction,
             f"must give a whole number of examples k = batch_size × fraction that divides "
             f"batch_size = {batch} (every (batch_size/k)-th example gets the consistency loss)")
    elif accum is not None and batch % accum == 0 and (batch // accum) % round(batch / k):
      c.fail("consistency.batch_fraction", fraction,
             f"must take every s-th example (s = 1/fraction = {round(batch / k)}) of each "
             f"micro-batch: config.batch_size / config.optim.grad_accum_steps = {batch} / "
             f"{accum} = {batch // accum} must be divisible by s")
    if kind == "naive":
      c.fail("consistency.weight", weight, "must be 0 with loss.kind='naive' (the naive "
             "baseline ignores σ_n, so there is nothing to be consistent below)")

  # optimiser, EMA
  c.number("optim.lr", 0.0, low_open=True)
  c.int_at_least("optim.warmup_steps", 0)
  c.number("optim.b1", 0.0, 1.0, high_open=True)
  c.number("optim.b2", 0.0, 1.0, high_open=True)
  c.number("optim.eps", 0.0, low_open=True)
  c.number("optim.grad_clip", 0.0)
  c.number("optim.weight_decay", 0.0)
  halflives = tuple(c.get("ema.halflife_kimg"))
  if not halflives or not all(_is_num(h) and h > 0 for h in halflives):
    c.fail("ema.halflife_kimg", halflives, "must be a non-empty tuple of positive numbers "
           "(EDM half-lives in thousands of images)")
  c.number("ema.rampup_ratio", 0.0)
  sample_with = c.get("ema.sample_with")
  if not _is_int(sample_with) or not 0 <= sample_with < max(len(halflives), 1):
    c.fail("ema.sample_with", sample_with, f"must index ema.halflife_kimg (0..{len(halflives) - 1})")

  # mesh and the batch split
  data_size = c.get("mesh.data")
  fsdp = c.int_at_least("mesh.fsdp", 1)
  c.int_at_least("mesh.fsdp_min_size", 1)
  if not _is_int(data_size) or not (data_size == -1 or data_size >= 1):
    c.fail("mesh.data", data_size, "must be -1 (all remaining devices) or an integer >= 1")
    data_size = None
  if num_devices is None:
    import jax  # pylint: disable=g-import-not-at-top
    num_devices = jax.device_count()
  dp = None
  if fsdp is not None and data_size is not None:
    if num_devices % fsdp:
      c.fail("mesh.fsdp", fsdp, f"must divide the number of devices ({num_devices})")
    else:
      dp_data = num_devices // fsdp if data_size == -1 else data_size
      if dp_data * fsdp != num_devices:
        c.fail("mesh.data", data_size, f"mesh.data × mesh.fsdp must equal the {num_devices} "
               "devices; use -1 to take all remaining devices")
      else:
        dp = dp_data * fsdp
  if dp is not None and batch is not None and batch % dp:
    c.fail("batch_size", batch, f"must be divisible by the data-parallel size {dp} "
           f"(mesh.data × mesh.fsdp over {num_devices} devices)")
  elif dp is not None and batch is not None and accum is not None and batch % (accum * dp):
    c.fail("optim.grad_accum_steps", accum, f"must split config.batch_size = {batch} into "
           f"micro-batches that split evenly over the {dp} devices of the batch (mesh.data × "
           f"mesh.fsdp): batch_size must be divisible by grad_accum_steps × devices = {accum} × "
           f"{dp} = {accum * dp}")

  c.int_at_least("cpu_devices", 0)
  problem = cpu_defaults.flags_problem(c.get("cpu_xla_flags"))
  if problem:
    c.fail("cpu_xla_flags", c.get("cpu_xla_flags"), problem)

  # logging, checkpoints, samples
  c.int_at_least("log_every_steps", 1)
  c.int_at_least("checkpoint.every_steps", 1)
  c.int_at_least("checkpoint.max_to_keep", 1)
  c.int_at_least("checkpoint.keep_every_steps", 0)
  c.int_at_least("sample.every_steps", -1)
  num_images = c.int_at_least("sample.num_images", 1)
  if dp is not None and num_images is not None and num_images % dp:
    c.fail("sample.num_images", num_images, f"must be divisible by the data-parallel size {dp}")
  c.int_at_least("sample.num_steps", 2)
  c.int_at_least("sample.seed", 0)
  t = c.get("sample.truncate_sigma")
  if not _is_num(t) or not (t == -1 or t >= 0):
    c.fail("sample.truncate_sigma", t, "must be -1 (the largest data σ_n) or a number >= 0")
  c.number("sample.s_churn", 0.0)
  del steps
  if c.errors:
    raise ConfigError.of(c.errors)
