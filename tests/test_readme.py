"""The README's configuration table must list every setting, with its flag and variable."""

from __future__ import annotations

from tests.conftest import ROOT
from wicore_cpp.config import Config


def test_readme_configuration_table_lists_every_setting():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = readme.split("## Configuration", 1)[1].split("\n## ", 1)[0]
    rows = {line.split("|")[1].strip().strip("`"): line for line in section.splitlines()
            if line.startswith("| `")}
    missing = [name for name in Config.model_fields if name not in rows]
    assert not missing, f"README configuration table lacks {missing}"
    for name in Config.model_fields:
        row = rows[name]
        assert f"`--{name.replace('_', '-')}`" in row, row
        assert f"`WICORE_{name.upper()}`" in row, row


def test_readme_quick_start_uses_the_two_make_targets():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    quick = readme.split("## Quick start", 1)[1].split("##", 1)[0]
    assert "make serve" in quick and "make test" in quick
    makefile = (ROOT / "Makefile").read_text(encoding="utf-8")
    assert "\nserve:" in makefile and "\ntest:" in makefile
    assert "make test" in (ROOT / ".ci" / "run").read_text(encoding="utf-8")
