"""Project-level promises: the compose file validates, the CLI documents every setting."""

from __future__ import annotations

import shutil
import subprocess

import pytest

from core.settings import Settings, settings_table
from headwater.cli import build_parser
from tests.stackutil import REPO


@pytest.mark.skipif(shutil.which("docker-compose") is None, reason="docker-compose not installed (make system)")
def test_docker_compose_file_validates():
    subprocess.run(["docker-compose", "-f", str(REPO / "docker-compose.yml"), "config", "-q"],
                   check=True, cwd=REPO, timeout=60)


def test_every_setting_has_env_var_and_doc_on_one_page(capsys):
    from headwater.cli import main

    rows = settings_table()
    assert {r[0] for r in rows} == set(Settings.model_fields)
    assert main(["settings"]) == 0
    page = capsys.readouterr().out
    for name, env, _default, doc in rows:
        assert env == f"HEADWATER_{name.upper()}"
        assert doc, f"setting {name} has no doc"
        assert name in page and env in page


def test_command_help_does_not_repeat_the_settings():
    subparsers = build_parser()._subparsers._group_actions[0].choices
    for name, sub in subparsers.items():
        text = sub.format_help()
        assert "--set NAME=VALUE" in text, name
        assert "--http-port" not in text and "--kafka-port" not in text, name
    assert len(subparsers["replay"].format_help().splitlines()) < 45


def test_env_and_flags_override_defaults(monkeypatch):
    from headwater.cli import load_settings

    monkeypatch.setenv("HEADWATER_TOPIC_PREFIX", "x-")
    monkeypatch.setenv("HEADWATER_HTTP_PORT", "9001")
    args = build_parser().parse_args(["status", "--set", "http_port=9002"])
    s = load_settings(args)
    assert s.topic_prefix == "x-" and s.http_port == 9002
    assert s.topics["clicks"] == "x-clicks"
    assert s.admin_token is None and s.bind_host == "127.0.0.1"


def test_tests_use_the_kit_not_global_patches():
    """No test swaps ``asyncio.sleep`` (or a module's ``send_all``) for everyone: the
    agents take a ``sleep`` and a sink, and ``headwater.testing`` hands out a
    ``ManualClock`` whose ``sleep`` moves it, in-memory stores, windows and logs."""
    import re

    patch = re.compile(r"(asyncio\.sleep|\.send_all)\s*=[^=]|setattr\([^)]*[\"'](sleep|send_all)[\"']")
    found = [f"{path.relative_to(REPO)}:{n}" for path in sorted((REPO / "tests").rglob("*.py"))
             for n, line in enumerate(path.read_text().splitlines(), 1) if patch.search(line)]
    assert found == []
