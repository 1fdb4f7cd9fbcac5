"""benchmarks/latent_memorization.py's building blocks (its --quick run takes minutes): the
tiny pretrained folder it writes is a diffusers SD folder that the project's loading path
opens, prepares latents from and samples with the right shapes; and a --quick run at toy
sizes from the repository root leaves the repository as it was and says where it wrote."""

import argparse
import importlib.util
import json
import pathlib
import sys
import tempfile

import numpy as np
import pytest

from tests import benchmark_outputs

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))  # the benchmark imports benchmarks/_output.py


def _benchmark():
  spec = importlib.util.spec_from_file_location(
      "latent_memorization_bench", ROOT / "benchmarks" / "latent_memorization.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_digits_split_keeps_the_nines_out_of_pretraining():
  bench = _benchmark()
  x_pre, y_pre, x_train, heldout = bench.split_digits(8, seed=0)
  assert x_pre.shape[1:] == (16, 16, 3) and not np.any(y_pre == bench.HELD_CLASS)
  assert len(x_train) == 8 and len(x_train) + len(heldout) == np.sum(
      bench.digit_features.load_digits(16)[1] == bench.HELD_CLASS)


def test_miniature_runs_end_to_end_through_the_project_path(tmp_path, monkeypatch, capsys):
  """The whole benchmark at toy sizes (2 steps everywhere): pretraining, preparation, a
  Trainer fine-tune, evaluation through latent.evaluation (samples, attack), the paper's
  instruments (attack on the pretrained model, Fig. 8, restoration) and the table/JSON/pictures. The numbers mean nothing here; that they are produced does. Run as
  --quick from the repository root with no --out: it writes only into a temporary folder
  (here under tmp_path) and prints each file it wrote."""
  bench = _benchmark()
  monkeypatch.chdir(ROOT)
  monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # where --quick's folder is made
  before = benchmark_outputs.git_status(ROOT)
  bench.main(["--quick", "--vae_steps", "2", "--unet_steps", "2", "--steps", "2",
              "--train_size", "8", "--batch", "8", "--num_samples", "8", "--sample_steps", "10",
              "--posterior_steps", "1", "--hot_steps", "3", "--t_n", "800", "--methods", "ambient",
              "--workdir", str(tmp_path / "work")])
  written = benchmark_outputs.printed_paths(capsys.readouterr().out)
  assert sorted(p.name for p in written) == [
      "latent_memorization_quick.json", "latent_memorization_quick.txt",
      "latent_memorization_quick_fig8.png", "latent_memorization_quick_samples.npz",
      "latent_memorization_quick_samples.png"]
  assert all(p.is_file() and tmp_path in p.parents for p in written)
  assert benchmark_outputs.git_status(ROOT) <= before  # nothing new in the repository
  out = written[0].parent / "latent_memorization_quick"
  result = json.loads(out.with_suffix(".json").read_text())
  names = [r["name"] for r in result["results"]]
  assert names == ["held-out real nines", "pretrained (no fine-tune)", "ambient"]
  ambient = result["results"][-1]
  assert ambient["t_n"] == 800 and ambient["sampling"] == "truncated"
  assert np.isfinite(ambient["fd"]) and ambient["samples_nn"]["count"] == 8
  for method in ("mmse", "posterior"):
    assert ambient["attack"][method]["count"] == 8  # every fine-tuning image attacked
  assert result["copy_rmse"] > 0
  # The paper's instruments through python -m ambient_jax.attack's library path.
  seen_unseen = result["pretrained_attack"]
  assert sorted(seen_unseen) == ["seen (pretraining digits)", "unseen (held-out nines)"]
  for entry in seen_unseen.values():
    assert entry["posterior"]["count"] == 8 and "hot_start_timestep" in entry
  assert list(result["fig8"]) == ["ambient t_n=800"]  # quick: the one model there is
  table = result["restoration"]["ambient t_n=800"]
  assert sorted(table) == ["100", "500", "800", "900"] and table["900"]["count"] == 8
  assert "| ambient | 800 | truncated |" in out.with_suffix(".txt").read_text()
  finished = json.loads((tmp_path / "work" / "runs" / "ambient_t800" / bench.FINISHED).read_text())
  assert finished["seconds"] == ambient["train_seconds"]  # what a later run would reuse

  # --recompute re-measures the saved samples (uint8, one array per row) without a model:
  # today's code on the same samples gives the run's own figures.
  with np.load(str(out) + "_samples.npz") as saved:
    assert [saved[f"row_{i}"].shape for i in range(3)] == [(8, 16, 16, 3)] * 3
    assert saved["row_0"].dtype == np.uint8
  bench.main(["--recompute", "--quick", "--out", str(out.parent)])
  again = json.loads(out.with_suffix(".json").read_text())
  assert "recomputed" in again and again["copy_rmse"] == pytest.approx(result["copy_rmse"])
  for before, after in zip(result["results"], again["results"]):
    assert after["fd"] == pytest.approx(before["fd"], rel=1e-5), before["name"]
    assert after["samples_nn"] == pytest.approx(before["samples_nn"], rel=1e-5), before["name"]
    assert after.get("attack") == before.get("attack")  # kept as recorded
  assert "recomputed from latent_memorization_quick_samples.npz" in out.with_suffix(".txt").read_text()
  with pytest.raises(SystemExit, match="missing"):
    bench.main(["--recompute", "--out", str(tmp_path / "nowhere")])

  # The pretrained folder it wrote is a diffusers SD folder that the project's loading path
  # opens, and the latents it prepared from it are at t_n's level.
  from ambient_jax.data import latent as dataset_lib  # pylint: disable=g-import-not-at-top
  from ambient_jax.latent import pipeline  # pylint: disable=g-import-not-at-top
  folder = tmp_path / "work" / "pretrained"
  index = json.loads((folder / "model_index.json").read_text())
  assert index["_class_name"] == "StableDiffusionPipeline"
  pipe = pipeline.load_pretrained(folder)
  assert not pipe.is_sdxl and pipe.latent_scale_factor == 2
  data = dataset_lib.open_latent_dataset(str(tmp_path / "work" / "latents_t800"))
  assert data.num_examples == 8 and data.latent_shape == (8, 8, 4)
  np.testing.assert_allclose(data.sigma_n, float(pipe.schedule.vp_sigmas[800]), rtol=1e-3)


def test_a_finished_fine_tune_is_reused_and_one_with_another_config_is_refused(tmp_path):
  """A fine-tune the same --workdir finished with the same config is not trained again (here
  the pretrained folder and dataset do not even exist); a different config, or a finished
  record whose checkpoint is gone, is a one-line error."""
  bench = _benchmark()
  args = argparse.Namespace(consistency_weight=None, consistency_start=0.5, consistency_step=None,
                            consistency_anchor=None, lora_rank=0, steps=2, batch=8, lr=2e-4, seed=0)
  config = bench.finetune_config("ambient", 800, "no/folder", "no/dataset", args)
  (tmp_path / bench.FINISHED).write_text(json.dumps(dict(config=config.to_json(sort_keys=True),
                                                         seconds=12.5)))
  with pytest.raises(SystemExit, match="not its step-2 checkpoint"):  # deleted checkpoints
    bench.finetune("ambient", 800, "no/folder", "no/dataset", str(tmp_path), args)
  (tmp_path / "checkpoints" / "2").mkdir(parents=True)
  assert bench.finetune("ambient", 800, "no/folder", "no/dataset", str(tmp_path), args) == 12.5
  args.lr = 1e-3
  with pytest.raises(SystemExit, match="another config"):
    bench.finetune("ambient", 800, "no/folder", "no/dataset", str(tmp_path), args)


def test_a_model_sampled_two_ways_is_attacked_once(monkeypatch, tmp_path):
  """ambient + consistency is measured with full and with truncated sampling: the attack
  (the same model, the same images) runs once, its figures serve both rows, and the second
  row's sample copies are measured on its own samples with the first row's calibration."""
  bench = _benchmark()
  from ambient_jax.metrics import memorization  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  clean = rng.uniform(-1, 1, (6, 16, 16, 3)).astype(np.float32)
  features = lambda x: np.asarray(x).reshape(len(x), -1)
  ev = object.__new__(bench.Evaluator)
  ev.args = argparse.Namespace(num_samples=4, seed=0, sample_steps=2, guidance_scale=1.0,
                               attack_t=800, posterior_steps=1)
  ev.features, ev.ref_features, ev.heldout, ev.copy_rmse = features, features(clean), clean, None
  ev._attacks, index = {}, memorization.NearestNeighbourIndex(clean, features)
  ev._fine_tuning_set = {"data": (clean, index)}
  run = argparse.Namespace(root=tmp_path, step=2, sigma_n_max=0.9,
                           config=argparse.Namespace(latent=argparse.Namespace(dataset="data")))
  samples = {"full": clean[:4] + 0.01, "truncated": clean[2:6] * 0.5}
  monkeypatch.setattr(bench.evaluation, "sample_images", lambda r, mode, *a, **k: samples[mode])
  calls = []

  def report(run, clean, samples, *args, **kwargs):
    calls.append(samples)
    nn, _ = memorization.nearest_neighbours(samples, index=index, copy_rmse=0.05)
    return {"memorization": dict(heldout={"copy_rmse": 0.05}, samples=nn, attack_sigma_ve=3.0,
                                 mmse={"frac_copies": 0.5}, posterior={"frac_copies": 0.25})}

  monkeypatch.setattr(bench.evaluation, "memorization_report", report)
  full, _, _ = ev.measure(run, "full")
  truncated, _, _ = ev.measure(run, "truncated")
  assert len(calls) == 1 and truncated["attack"] == full["attack"]
  assert full["attack"]["posterior"] == {"frac_copies": 0.25}
  expected, _ = memorization.nearest_neighbours(samples["truncated"], index=index, copy_rmse=0.05)
  assert truncated["samples_nn"] == expected and full["samples_nn"] != expected


def test_consistency_step_and_anchor_reach_the_fine_tune_config():
  """--consistency_step / --consistency_anchor set the consistency chains' step kind and the
  anchor of the ambient + consistency fine-tunes (unset: the loss's own defaults, plain
  posterior steps and the network's anchor), and the config they make validates."""
  import argparse  # pylint: disable=g-import-not-at-top
  from ambient_jax.training import config_validation  # pylint: disable=g-import-not-at-top
  bench = _benchmark()
  args = argparse.Namespace(consistency_weight=None, lora_rank=0, steps=40, batch=8, lr=2e-4,
                            consistency_start=0.5, seed=0, consistency_step="posterior_cov",
                            consistency_anchor="data")
  config = bench.finetune_config("ambient_consistency", 500, "pretrained", "latents", args)
  assert config.consistency.kwargs.step == "posterior_cov" and config.consistency.kwargs.anchor == "data"
  config_validation.validate(config, num_devices=1)
  args.consistency_step = args.consistency_anchor = None
  config = bench.finetune_config("ambient_consistency", 500, "pretrained", "latents", args)
  assert config.consistency.kwargs.step is None and config.consistency.kwargs.anchor is None
