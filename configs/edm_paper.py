"""Paper-faithful pixel-space EDM runs of "How much is a noisy image worth?" (arXiv 2411.02780).

Shared by configs/{cifar10,celeba64,ffhq64,afhq64,imagenet64}.py; runnable by itself as
`--config=configs/edm_paper.py:dataset=cifar10,sigma_n=0.1`.

Settings (METHOD.md §9): DDPM++ (EDM's `--arch=ddpmpp`), batch 512, Adam lr 1e-3,
dropout 0.13, EMA half-life 0.5 Mimg, CIFAR-10 200k steps; ImageNet-64 uses EDM's ADM,
class-conditional. σ_n ∈ {0.05, 0.1, 0.2}.

Variants (comma-separated `key=value`, or a bare keyword), e.g.
    configs/cifar10.py                      ambient + consistency, σ_n = 0.2
    configs/cifar10.py:sigma_n=0.05         another noise level
    configs/cifar10.py:clean                clean-data EDM baseline (σ_n = 0)
    configs/cifar10.py:naive,sigma_n=0.1    naive baseline: plain EDM on the noisy images
    configs/cifar10.py:ambient_only         ambient loss without consistency
    configs/cifar10.py:clean_fraction=0.1   10 % clean + 90 % noisy mixture
    configs/cifar10.py:smoke                tiny model and batch, 2 steps: a CPU check
Keys: dataset, sigma_n, clean_fraction, consistency (λ_c, 0 = off; default the paper's:
0.01, or 1e-4 at its highest noise level σ_n >= 0.2, where larger values collapsed), mode
(ambient | naive | clean), smoke.
"""

import importlib.util
import pathlib

import ml_collections


def _default_module():
  spec = importlib.util.spec_from_file_location(
      "ambient_jax_configs_default", pathlib.Path(__file__).with_name("default.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


# Per dataset: (registry name, resolution, channels, steps, architecture overrides).
_SONG_32 = dict(name="ddpmpp", model_channels=128, channel_mult=(2, 2, 2), num_blocks=4,
                attn_resolutions=(16,))
_SONG_64 = dict(name="ddpmpp", model_channels=128, channel_mult=(1, 2, 2, 2), num_blocks=4,
                attn_resolutions=(16,))
_ADM_64 = dict(name="adm", model_channels=192, channel_mult=(1, 2, 3, 4), num_blocks=3,
               attn_resolutions=(32, 16, 8))
DATASETS = {
    "cifar10": dict(data="cifar10", res=32, steps=200_000, model=_SONG_32),
    "celeba64": dict(data="celeba_hq64", res=64, steps=200_000, model=_SONG_64),
    "ffhq64": dict(data="ffhq64", res=64, steps=200_000, model=_SONG_64),
    "afhq64": dict(data="afhq64", res=64, steps=200_000, model=_SONG_64),
    "imagenet64": dict(data="imagenet64", res=64, steps=500_000, model=_ADM_64, label_dim=1000),
}
MODES = ("ambient", "naive", "clean")
PAPER_LAMBDA, PAPER_LAMBDA_HIGHEST_NOISE = 0.01, 1e-4
# One example of each variant and what it does: `--list_configs` prints them, a test loads each.
VARIANTS = {
    "sigma_n=0.1": "noise level of the noisy examples (the paper's 0.05, 0.1, 0.2; default 0.2)",
    "clean": "clean-data EDM baseline (σ_n = 0)",
    "naive": "naive baseline: plain EDM on the noisy images",
    "ambient_only": "ambient loss without the consistency term",
    "clean_fraction=0.1": "this share of the examples clean (σ_n = 0), the rest noisy",
    "consistency=0.01": "λ_c (0 = off; default the paper's: 0.01, 1e-4 at σ_n >= 0.2)",
    "consistency_start=150000": "the step from which the consistency term is on",
    "smoke": "tiny model and batch, 2 steps: a CPU check of the whole pipeline",
    "dataset=afhq64": f"edm_paper.py only: which dataset, one of {', '.join(DATASETS)}",
}


def parse_arg(arg, **defaults):
  """big_vision-style 'a=1,b=x,flag' -> dict with the types of `defaults`; bare words set True
  (or, for a mode name, mode=word)."""
  out = dict(defaults)
  for item in filter(None, (arg or "").split(",")):
    key, _, value = item.partition("=")
    key = key.strip()
    if not _:
      if key in MODES:
        out["mode"] = key
        continue
      if key == "ambient_only":
        out["consistency"] = 0.0
        continue
      value = "True"
    if key not in defaults:
      raise ValueError(f"Config variant key {key!r} is unknown; allowed: {sorted(defaults)} "
                       f"or one of {MODES + ('ambient_only',)}.")
    kind = type(defaults[key])
    out[key] = (value.lower() in ("1", "true", "yes")) if kind is bool else kind(value)
  return out


def paper_config(dataset: str, arg=None) -> ml_collections.ConfigDict:
  a = parse_arg(arg, dataset=dataset, sigma_n=0.2, clean_fraction=0.0, consistency=-1.0,
                consistency_start=150_000, mode="ambient", smoke=False)
  if a["consistency"] < 0 and a["consistency"] != -1.0:
    raise ValueError(f"Config variant consistency={a['consistency']}: λ_c must be >= 0 "
                     "(0 = off; leave it out for the paper's value).")
  if a["consistency"] < 0:  # not given: the paper's λ_c (METHOD.md §5)
    a["consistency"] = PAPER_LAMBDA_HIGHEST_NOISE if a["sigma_n"] >= 0.2 else PAPER_LAMBDA
  if a["dataset"] not in DATASETS:
    raise ValueError(f"Config variant dataset={a['dataset']!r} is unknown; allowed: "
                     f"{sorted(DATASETS)}.")
  d = DATASETS[a["dataset"]]
  c = _default_module().base_config()
  c.num_train_steps = d["steps"]
  c.batch_size = 512
  c.data.name = d["data"]
  c.data.resolution = d["res"]
  c.data.sigma_n = 0.0 if a["mode"] == "clean" else a["sigma_n"]
  c.data.clean_fraction = a["clean_fraction"]
  c.model = ml_collections.ConfigDict(dict(
      d["model"], img_resolution=d["res"], in_channels=3, dropout=0.13,
      label_dim=d.get("label_dim", 0), dtype="float32"))
  c.loss.kind = "naive" if a["mode"] == "naive" else "ambient"
  c.optim.lr = 1e-3
  c.optim.warmup_steps = 10_000_000 // 512  # EDM: lr ramp over 10 Mimg
  c.optim.grad_clip = 0.0  # EDM does not clip
  c.ema.halflife_kimg = (500.0,)
  c.ema.rampup_ratio = 0.05
  # Consistency as in the paper: a fine-tune after ~150k plain steps, λ_c above, on a
  # 32-example slice of the 512 batch (follow-up). Off for the baselines.
  use_consistency = a["mode"] == "ambient" and a["consistency"] > 0 and c.data.sigma_n > 0
  c.consistency.weight = a["consistency"] if use_consistency else 0.0
  c.consistency.start_step = a["consistency_start"]
  c.consistency.batch_fraction = 32 / 512
  c.consistency.kwargs = _default_module().below_sigma_n_kwargs()
  c.log_every_steps = 100
  c.checkpoint.every_steps = 5000
  c.checkpoint.max_to_keep = 3
  c.checkpoint.keep_every_steps = 50_000
  c.sample.every_steps = 10_000
  c.sample.num_images = 64
  if a["smoke"]:  # the same pipeline at a size one CPU step can afford
    c.num_train_steps = 2
    c.batch_size = 16
    c.model.model_channels = 16
    c.model.num_blocks = 1
    c.optim.warmup_steps = 1
    c.consistency.start_step = 0
    c.consistency.batch_fraction = 0.25
    c.consistency.kwargs.chain_steps = 1
    c.checkpoint.every_steps = 2
    c.sample.every_steps = 0
    c.sample.num_images = 8
    c.sample.num_steps = 4
  return c


def get_config(arg=None) -> ml_collections.ConfigDict:
  a = parse_arg(arg, dataset="cifar10", sigma_n=0.2, clean_fraction=0.0, consistency=0.01,
                consistency_start=150_000, mode="ambient", smoke=False)
  return paper_config(a.pop("dataset"), arg)
