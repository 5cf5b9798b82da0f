"""Settings: sources and their order, and docs that match the code."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest
from pydantic import ValidationError

from conduit.settings import Settings

ROOT = Path(__file__).resolve().parent.parent


def test_order_file_env_overrides(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text('http_port = 1111\napi_port = 2222\nlog_level = "debug"\n')
    monkeypatch.setenv("CONDUIT_API_PORT", "3333")
    s = Settings.load(cfg, log_level="error")
    assert (s.http_port, s.api_port, s.log_level) == (1111, 3333, "error")
    assert s.database == Path("data/conduit.db")


def test_refusals_name_the_setting(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text("http_port = 99999\n")
    with pytest.raises(ValidationError, match="http_port"):
        Settings.load(cfg)
    with pytest.raises(FileNotFoundError):
        Settings.load(tmp_path / "missing.toml")
    monkeypatch.setenv("CONDUIT_RATE", "fast")
    with pytest.raises(ValidationError, match="rate"):
        Settings.load()


def test_example_file_holds_every_setting_with_its_default() -> None:
    example = ROOT / "deploy" / "conduit.example.toml"
    text = example.read_text()
    values = tomllib.loads(text)
    for name, field in Settings.model_fields.items():
        assert name in text, f"{name} missing from {example}"
        if name in values:
            assert values[name] == (str(field.default) if isinstance(field.default, Path)
                                    else field.default), name
    Settings.load(example)


def test_configuration_doc_lists_every_setting() -> None:
    """Each row as the code has it: name, variable, default and meaning."""
    doc = (ROOT / "docs" / "configuration.md").read_text()

    def shown(value: object) -> str:
        if value is None:
            return "(none)"
        return str(value).lower() if isinstance(value, bool) else str(value)

    for name, field in Settings.model_fields.items():
        row = (
            f"| `{name}` | `CONDUIT_{name.upper()}` | `{shown(field.default)}` |"
            f" {field.description} |"
        )
        assert row in doc, row


def test_the_cluster_example_loads(monkeypatch: pytest.MonkeyPatch) -> None:
    """deploy/cluster/conduit.toml, with what compose.yaml puts in the environment."""
    monkeypatch.setenv("CONDUIT_POSTGRES_DSN", "postgresql://conduit:pw@postgres:5432/conduit")
    settings = Settings.load(ROOT / "deploy" / "cluster" / "conduit.toml")
    assert (settings.store, settings.bus, settings.sessions) == ("postgres", "nats", "store")


def test_node_ids_of_nodes_on_ports_the_system_picks_differ() -> None:
    """Derived from the MQTT port, except for port 0: then every start has a name of its own
    (nodes started with port 0 on one host once all took the same name, and ignored each
    other's session takeovers)."""
    from conduit.app import node_id

    assert node_id(Settings(mqtt_port=0)) != node_id(Settings(mqtt_port=0))
    assert node_id(Settings(mqtt_port=1883)) == node_id(Settings(mqtt_port=1883))
    assert node_id(Settings(node_id="edge-1")) == "edge-1"
