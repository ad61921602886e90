"""The README's code runs as written: its "phi_helpers in one screen" block, on the tiny dry-run model
(``PHI_HELPERS_MODEL=tiny``, as the README's dry runs use it), from the repository's root."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_one_screen_example_runs_on_the_dry_run_model(monkeypatch, capsys):
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = readme.split("## `phi_helpers` in one screen", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.DOTALL)[1]
    monkeypatch.setenv("PHI_HELPERS_MODEL", "tiny")
    monkeypatch.chdir(ROOT)
    namespace = {}
    exec(compile(code, "README.md", "exec"), namespace)  # noqa: S102  (the project's own README)
    assert isinstance(namespace["data"], dict) and 0 <= namespace["data"]["total"] <= 100000
    assert len(namespace["chat"]) == 4  # two questions, two answers
