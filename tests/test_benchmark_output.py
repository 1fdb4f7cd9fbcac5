"""benchmarks/_output.py: where a benchmark writes when not told, and what it says it wrote."""

import os
import pathlib
import sys
import tempfile

from tests import benchmark_outputs

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
import _output  # noqa: E402  pylint: disable=wrong-import-position


def test_default_folder_is_under_the_working_directory_and_quick_is_temporary(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  full = _output.OutputFolder(None, "bench")
  assert pathlib.Path(full.folder).resolve() == tmp_path / "benchmark_results" / "bench"
  monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
  os.makedirs(tmp_path / "tmp")
  quick = _output.OutputFolder(None, "bench", quick=True)
  assert pathlib.Path(quick.folder).parent == tmp_path / "tmp" and os.listdir(quick.folder) == []
  given = _output.OutputFolder(str(tmp_path / "given"), "bench", quick=True)
  assert given.folder == str(tmp_path / "given") and os.path.isdir(given.folder)
  # file names: --name, else the benchmark's (with _quick), as the committed results are named
  assert given.prefix() == str(tmp_path / "given" / "bench_quick")
  assert full.prefix("other") == os.path.join("benchmark_results", "bench", "other")


def test_report_prints_the_files_written_or_changed_since_the_start(tmp_path, capsys):
  (tmp_path / "kept.txt").write_text("old")
  (tmp_path / "changed.txt").write_text("old")
  outputs = _output.OutputFolder(str(tmp_path), "bench")
  (tmp_path / "changed.txt").write_text("new, longer")
  (tmp_path / "sub").mkdir()
  (tmp_path / "sub" / "new.png").write_bytes(b"png")
  assert outputs.report() == [str(tmp_path / "changed.txt"), str(tmp_path / "sub" / "new.png")]
  out = capsys.readouterr().out
  assert out.splitlines()[0] == f"output folder: {tmp_path}"
  assert benchmark_outputs.printed_paths(out) == [tmp_path / "changed.txt", tmp_path / "sub" / "new.png"]
