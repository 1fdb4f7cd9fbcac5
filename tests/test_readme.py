"""README.md's code example runs as written, so it cannot rot."""

import pathlib
import re

import jax.numpy as jnp

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
