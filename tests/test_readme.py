"""README.md's code example runs as written, so it cannot rot."""

import pathlib
import re

import jax.numpy as jnp
import pytest

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def test_readme_losses_example_runs():
  text = README.read_text()
  marker = text.index("<!-- readme-example")
  code = re.search(r"```python\n(.*?)```", text[marker:], re.S).group(1)
  namespace = {}
  exec(compile(code, "README.md example", "exec"), namespace)
  assert set(namespace["grads"]) == {"mu", "s2"}
  assert namespace["full"].shape == (16, 2) and namespace["truncated"].shape == (16, 2)
  assert bool(jnp.all(jnp.isfinite(namespace["full"])))


def test_readme_gives_the_test_command_that_ci_runs():
  ci = (README.parent / ".ci" / "run").read_text()
  assert "python -m pytest tests -n 2" in README.read_text() and "python -m pytest tests -n 2" in ci
  assert "pip install -e '.[test]'" in ci


DOCS = sorted((README.parent / "docs").glob("*.md"))
PAGES = [README] + DOCS


def _slug(heading: str) -> str:
  """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
  return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def _anchors(page: pathlib.Path) -> set[str]:
  text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)  # no headings in code
  return {_slug(m) for m in re.findall(r"^#+ (.+)$", text, re.M)}


def test_slug_follows_github():
  assert _slug("Below σ_n at high noise (σ_n = 0.2)") == "below-σ_n-at-high-noise-σ_n--02"
  assert _slug("CPU speed against EDM's PyTorch") == "cpu-speed-against-edms-pytorch"


def test_readme_is_a_front_page():
  """README holds what a user needs (≤ 300 lines); the research log lives in docs/."""
  assert len(README.read_text().splitlines()) <= 300
  assert DOCS, "docs/ has the detailed pages README links to"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_relative_link_resolves(page):
  """Links to files and to headings (#anchor) in README and docs/ point at something."""
  broken = []
  text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
  for target in re.findall(r"\]\(([^)\s]+)\)", text):
    if re.match(r"[a-z]+://", target):
      continue
    path, _, anchor = target.partition("#")
    dest = (page.parent / path).resolve() if path else page
    if not dest.exists():
      broken.append(target)
    elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
      broken.append(target)
  assert not broken, f"{page.name}: broken links {broken}"


@pytest.mark.parametrize("page", DOCS, ids=lambda p: p.name)
def test_each_docs_page_says_what_it_shows_first(page):
  """A title, then at most three lines saying what the page shows, then a blank line."""
  lines = page.read_text().splitlines()
  assert lines[0].startswith("# ") and lines[1] == ""
  summary = lines[2:lines.index("", 2)]
  assert 1 <= len(summary) <= 3, summary


def test_every_marked_example_in_readme_and_docs_runs():
  """Blocks after a `<!-- readme-example` marker, in README or docs/, run as written."""
  ran = 0
  for page in PAGES:
    text = page.read_text()
    for marker in re.finditer(r"<!-- readme-example", text):
      code = re.search(r"```python\n(.*?)```", text[marker.start():], re.S).group(1)
      exec(compile(code, f"{page.name} example", "exec"), {})
      ran += 1
  assert ran >= 1
