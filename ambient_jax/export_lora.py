"""Export a latent run's LoRA adapters for diffusers: `python -m ambient_jax.export_lora`.

    python -m ambient_jax.export_lora --workdir=DIR --out=FILE.safetensors [--ema=0 | --raw] [--step=N]

Restores DIR's checkpoint (latest, or --step) as `python -m ambient_jax.evaluate` does, takes
EMA --ema (default 0) or, with --raw, the raw parameters, attaches them to the UNet of the
run's pretrained folder (its structure only: the base weights are never read, so exporting
from an SDXL run needs no 5 GB load) and writes its adapters with `latent.lora.save_lora`: the diffusers /
PEFT LoRA format, "unet.<module>.lora_A.weight" [r, in] / "lora_B.weight" [out, r] with
α / r folded into B, float32 unless --dtype. No torch is needed; in PyTorch

    pipe = StableDiffusionXLPipeline.from_pretrained(PRETRAINED)
    pipe.load_lora_weights(FILE)

gives the UNet that the run's model is (tests/test_latent_evaluate.py checks the parity).
A mistake (a pixel run, a full fine-tune without adapters, a missing step) is one line
and exit status 2 or 1 (`ambient_jax.cli`).
"""

from __future__ import annotations

from ambient_jax import cli

DTYPES = ("float32", "bfloat16", "float16")


def export(workdir: str, out: str, *, step: int | None = None, ema: int = 0,
           dtype: str = "float32", devices=None, run=None) -> str:
  """Writes `out`; returns its path. ema < 0 takes the raw parameters. `run`: an already
  restored `evaluation.latent.LatentRun` of the workdir (skips the restore)."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from ambient_jax.evaluation import latent as evaluation  # pylint: disable=g-import-not-at-top
  if dtype not in DTYPES:
    raise cli.UsageError(f"--dtype={dtype!r} is not allowed: expected one of {DTYPES}.")
  if not out.endswith(".safetensors"):
    raise cli.UsageError(f"--out={out}: give a .safetensors file name (diffusers' "
                         "load_lora_weights reads safetensors).")
  if run is None:  # the adapters only: the base UNet's weights are never read
    run = evaluation.LatentRun(workdir, step, ema, devices=devices, base_weights=False)
  path = evaluation.export_lora(run, out, dtype=getattr(jnp, dtype))
  print(f"[export_lora] wrote {path}: adapters of {run.workdir} step {run.step} ({run.weights}); "
        f"load with pipe.load_lora_weights on {run.task.pretrained}", flush=True)
  return path


def main(argv):
  from absl import flags  # pylint: disable=g-import-not-at-top
  if len(argv) > 1:
    raise cli.UsageError(f"unexpected arguments {argv[1:]}: flags are written --name=value.")
  f = flags.FLAGS
  if f.raw and f["ema"].present:
    raise cli.UsageError("--raw and --ema exclude each other: --raw takes the raw parameters, "
                         "--ema=K the K-th EMA.")
  export(f.workdir, f.out, step=f.step, ema=-1 if f.raw else f.ema, dtype=f.dtype)


def _define_flags():
  from absl import flags  # pylint: disable=g-import-not-at-top
  flags.DEFINE_string("workdir", None, "Latent fine-tuning workdir.", required=True)
  flags.DEFINE_string("out", None, "Output .safetensors file.", required=True)
  flags.DEFINE_integer("step", None, "Checkpoint step (default: latest).")
  flags.DEFINE_integer("ema", 0, "Which EMA (index into config.ema.halflife_kimg).")
  flags.DEFINE_bool("raw", False, "Export the raw parameters instead of an EMA.")
  flags.DEFINE_enum("dtype", "float32", DTYPES, "dtype of the adapter tensors in the file.")


if __name__ == "__main__":
  _define_flags()
  cli.run(main, "ambient_jax.export_lora")
