"""The README's configuration table names every setting, and only real ones."""

from __future__ import annotations

import re
from pathlib import Path

from service.settings import Settings

README = Path(__file__).resolve().parents[1] / "README.md"


def test_configuration_table_matches_settings():
    text = README.read_text()
    section = text[text.index("## Configuration") :]
    section = section[: section.index("\n## ", 1)]
    documented = set(re.findall(r"^\| `UNFOLD_([A-Z_]+)` \|", section, flags=re.M))
    assert documented == {name.upper() for name in Settings.model_fields}
