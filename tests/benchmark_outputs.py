"""What the benchmark-output tests read: the `wrote PATH` lines a benchmark prints
(benchmarks/_output.py) and the repository's `git status`, to show a run left it as it was."""

from __future__ import annotations

import pathlib
import shutil
import subprocess

import pytest


def printed_paths(stdout: str) -> list[pathlib.Path]:
  """The paths of the `wrote PATH` lines in a benchmark's output, in order."""
  return [pathlib.Path(line[len("wrote "):]) for line in stdout.splitlines()
          if line.startswith("wrote ")]


def git_status(root: pathlib.Path) -> set[str]:
  """`git status --porcelain` lines (untracked files listed one by one); skips the test
  where `root` is not a git checkout (an unpacked sdist, no git)."""
  if shutil.which("git") is None or not (root / ".git").exists():
    pytest.skip("not a git checkout")
  out = subprocess.run(["git", "status", "--porcelain", "--untracked-files=all"], cwd=root,
                       capture_output=True, text=True, check=True).stdout
  return set(out.splitlines())
