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


def test_every_setting_has_env_var_flag_and_doc():
    rows = settings_table()
    assert {r[0] for r in rows} == set(Settings.model_fields)
    help_text = build_parser()._subparsers._group_actions[0].choices["worker"].format_help()
    for name, env, _default, doc in rows:
        assert env == f"HEADWATER_{name.upper()}"
        assert doc, f"setting {name} has no doc"
        assert f"--{name.replace('_', '-')}" in help_text


def test_env_and_flags_override_defaults(monkeypatch):
    from headwater.cli import load_settings

    monkeypatch.setenv("HEADWATER_TOPIC_PREFIX", "x-")
    monkeypatch.setenv("HEADWATER_HTTP_PORT", "9001")
    args = build_parser().parse_args(["status", "--http-port", "9002"])
    s = load_settings(args)
    assert s.topic_prefix == "x-" and s.http_port == 9002
    assert s.topics["clicks"] == "x-clicks"
    assert s.admin_token is None and s.bind_host == "127.0.0.1"
