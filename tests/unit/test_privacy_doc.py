"""docs/privacy.md's threat-model table names tests that exist."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
TABLE = "## Who can do what, and what stops them"


def _cited_tests() -> list[tuple[str, str]]:
    text = (ROOT / "docs" / "privacy.md").read_text()
    table = text[text.index(TABLE) :].split("\n## ", 1)[0]
    cited, module = [], None
    for match in re.finditer(r"`(tests/[\w/]+\.py)?::(\w+)`", table):
        module = match.group(1) or module
        cited.append((module, match.group(2)))
    return cited


def test_every_row_of_the_threat_table_names_an_existing_test():
    cited = _cited_tests()
    assert len(cited) >= 20
    for module, name in cited:
        source = (ROOT / module).read_text()
        assert re.search(rf"^def {name}\(", source, re.MULTILINE), f"{module}::{name}"
