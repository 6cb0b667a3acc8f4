"""docs/settings.md is generated from the settings models and must be current."""

from __future__ import annotations

from pathlib import Path

from fedmq.shared.settings_doc import render

ROOT = Path(__file__).resolve().parents[2]


def test_settings_reference_is_current():
    assert (ROOT / "docs" / "settings.md").read_text() == render(), (
        "docs/settings.md is stale: run `python -m fedmq.shared.settings_doc > docs/settings.md`"
    )


def test_every_setting_is_documented():
    from fedmq.aggregator.settings import AggregatorSettings
    from fedmq.site_agent.settings import SiteSettings

    text = render()
    for cls in (AggregatorSettings, SiteSettings):
        for name in cls.model_fields:
            assert f"`{name}` (`FEDMQ_{name.upper()}`)" in text
    undocumented = [line.split("|")[1] for line in text.splitlines() if line.startswith("| `") and line.endswith("|  |")]
    assert not undocumented, f"add a #: comment above these fields: {undocumented}"
