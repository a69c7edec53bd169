"""The README's configuration table lists every setting, with its environment variable."""

from __future__ import annotations

import re

from worker.config import REPO_ROOT, Settings


def test_readme_lists_every_setting() -> None:
    readme = (REPO_ROOT / "README.md").read_text(encoding="utf-8")
    listed = set(re.findall(r"^\| `INTENT_([A-Z0-9_]+)` \|", readme, flags=re.MULTILINE))
    assert listed == {name.upper() for name in Settings.model_fields}


def test_every_setting_has_a_description() -> None:
    assert [name for name, field in Settings.model_fields.items() if not field.description] == []
