"""AFHQv2 64x64 (images from config.data.manual_dir), DDPM++.

Variants and settings: see configs/edm_paper.py. Examples:
    python -m ambient_jax.main --config=configs/afhq64.py:sigma_n=0.1 --workdir=DIR
    python -m ambient_jax.main --config=configs/afhq64.py:naive,sigma_n=0.1 --workdir=DIR
    python -m ambient_jax.main --config=configs/afhq64.py:clean --workdir=DIR
"""

import importlib.util
import pathlib

_spec = importlib.util.spec_from_file_location(
    "ambient_jax_configs_edm_paper", pathlib.Path(__file__).with_name("edm_paper.py"))
edm_paper = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(edm_paper)
VARIANTS = edm_paper.VARIANTS  # listed by --list_configs


def get_config(arg=None):
  return edm_paper.paper_config("afhq64", arg)
