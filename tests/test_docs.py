from pathlib import Path

from sqakd.config import config_reference

DOCS = Path(__file__).resolve().parents[1] / "docs"


def test_configuration_reference_matches_the_schema():
    written = (DOCS / "configuration.md").read_text()
    assert written.strip() == config_reference().strip(), (
        "docs/configuration.md is stale: run `python -m sqakd.config > docs/configuration.md`"
    )
