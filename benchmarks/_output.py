"""Where a benchmark's files go: one rule for every script in benchmarks/ that writes any.

`--out DIR` names the folder. Without it a full run writes under
./benchmark_results/NAME (relative to where it runs; git ignores the one at the
repository root) and a `--quick` run into a fresh temporary folder, so running a
benchmark never touches the committed results in benchmarks/results/ unless asked:
`--out benchmarks/results` rewrites them under their usual file names. When it is done
the benchmark prints every file it wrote or changed there, one `wrote PATH` line each.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile

DEFAULT_ROOT = "benchmark_results"


def add_out_flags(parser: argparse.ArgumentParser, name: str, *, stem: bool = False) -> None:
  """Adds --out (the folder) and, for benchmarks whose files share a name stem, --name."""
  parser.add_argument(
      "--out", default=None,
      help=f"output folder (default ./{DEFAULT_ROOT}/{name}; with --quick a new temporary "
      "folder); --out benchmarks/results updates the committed results")
  if stem:
    parser.add_argument("--name", default=None,
                        help=f"file-name stem in --out (default {name}, {name}_quick with --quick)")


def saved_run(out: str) -> tuple[dict, str]:
  """A finished run's OUT.json (read) and the path of its OUT_samples.npz, for --recompute;
  a one-line exit when either is missing."""
  json_path, npz_path = out + ".json", out + "_samples.npz"
  for path in (json_path, npz_path):
    if not os.path.exists(path):
      raise SystemExit(f"--recompute: {path} is missing (a run with this --out/--name writes it).")
  with open(json_path) as f:
    return json.load(f), npz_path


def _snapshot(folder: str) -> dict[str, tuple[int, int]]:
  """(mtime_ns, size) of every file under `folder`: what was there before the run."""
  files = {}
  for root, _, names in os.walk(folder):
    for n in names:
      path = os.path.join(root, n)
      st = os.stat(path)
      files[path] = (st.st_mtime_ns, st.st_size)
  return files


class OutputFolder:
  """A benchmark's output folder (created), and the list of files the run wrote there.

  What was written is read from the folder itself (new or changed files since the
  start), so figures saved by library code are reported too, and nothing has to be
  registered at each write.
  """

  def __init__(self, out: str | None, name: str, quick: bool = False):
    if out:
      self.folder = out
    elif quick:
      self.folder = tempfile.mkdtemp(prefix=f"{name}_")
    else:
      self.folder = os.path.join(DEFAULT_ROOT, name)
    os.makedirs(self.folder, exist_ok=True)
    self.name, self.quick = name, quick
    self._before = _snapshot(self.folder)
    print(f"output folder: {os.path.abspath(self.folder)}", flush=True)

  def path(self, filename: str) -> str:
    """`filename` inside the output folder."""
    return os.path.join(self.folder, filename)

  def append(self, filename: str, lines: list[str]) -> str:
    """Appends `lines` to `filename` in the folder (a log of runs: each run adds its block);
    returns its path."""
    with open(self.path(filename), "a") as fh:
      fh.write("\n".join(lines) + "\n")
    return self.path(filename)

  def write_table(self, lines: list[str]) -> str:
    """Writes `lines` to PREFIX.txt (see `prefix`), replacing it; returns its path."""
    path = self.prefix() + ".txt"
    with open(path, "w") as fh:
      fh.write("\n".join(lines) + "\n")
    return path

  def prefix(self, stem: str | None = None) -> str:
    """Path prefix for a benchmark writing STEM.json, STEM.txt, ...: --name, else NAME
    (NAME_quick for --quick runs, the names the committed results carry)."""
    return self.path(stem or (self.name + ("_quick" if self.quick else "")))

  def written(self) -> list[str]:
    """Absolute paths of the files created or changed in the folder since the start."""
    now = _snapshot(self.folder)
    return sorted(os.path.abspath(p) for p, sig in now.items() if self._before.get(p) != sig)

  def report(self) -> list[str]:
    """Prints `wrote PATH` for every file written; returns the paths."""
    paths = self.written()
    for p in paths:
      print(f"wrote {p}", flush=True)
    return paths
