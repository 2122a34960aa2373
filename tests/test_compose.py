"""docker-compose.yml's Headwater services start, as the image would run them.

No container engine runs here, so the test plays the engine's part for what breaks
deployments in practice: each service's ``command`` and ``environment`` from the compose
file, the image's ``ENV`` and non-root ``USER`` from the Dockerfile, and named volumes
that start the way Docker starts them (filled from the image's directory at the mount
point, ownership included; root-owned when the image has no such directory). The
services then run against the embedded broker and Redis.

What differs from the containers, on purpose: host names and ports are rewritten to the
test's broker, Redis and free ports; the content encoder is the hashing one (no model
download); the interpreter is Debian's Python 3.11 (the venv's lives under /root, which
the service user cannot enter) with the venv's packages.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

from headwater.servers import free_port, stop_pid
from tests.stackutil import REPO, wait_until

pytestmark = pytest.mark.integration

PYTHON = Path("/usr/bin/python3.11")
SITE = Path(sys.prefix) / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}" / "site-packages"
HEALTH_PORT = {"worker": "HEADWATER_WORKER_PORT", "learner": "HEADWATER_LEARNER_PORT",
               "serve": "HEADWATER_HTTP_PORT"}


@dataclass
class Image:
    """What the Dockerfile says about the runtime: user, ENV, directories it owns."""

    uid: int
    env: dict[str, str]
    owned_dirs: set[str] = field(default_factory=set)

    @classmethod
    def parse(cls, text: str) -> Image:
        uid = int(re.search(r"useradd[^\n]*--uid (\d+)", text).group(1))
        env: dict[str, str] = {}
        for line in re.findall(r"^ENV (.+)$", text, re.M):
            for item in shlex.split(line):
                key, _, value = item.partition("=")
                env[key] = value
        owned: set[str] = set()
        for run in re.findall(r"^RUN (.+)$", text, re.M):
            for chown in re.findall(r"chown (?:-R )?\S+ ([^&\n]+)", run):
                owned.update(p for p in chown.split() if p.startswith("/"))
        return cls(uid, env, owned)


class Engine:
    """Named volumes and image directories on the host, as Docker would create them."""

    def __init__(self, root: Path, image: Image) -> None:
        self.root = root
        self.image = image
        self.volumes: dict[str, Path] = {}

    def _make(self, path: Path, owned: bool) -> Path:
        path.mkdir(parents=True, exist_ok=True)
        os.chown(path, self.image.uid if owned else 0, self.image.uid if owned else 0)
        path.chmod(0o755)
        return path

    def mounts(self, service: dict) -> dict[str, Path]:
        """Container path -> host path for the image's own directories and the volumes."""
        table = {d: self._make(self.root / "image" / d.strip("/"), owned=True)
                 for d in self.image.owned_dirs}
        for spec in service.get("volumes", []):
            name, target = spec.split(":")[:2]
            if name.startswith((".", "/")):
                continue  # bind mounts of config files: not used by Headwater's services
            if name not in self.volumes:
                self.volumes[name] = self._make(self.root / "volumes" / name,
                                                owned=target in self.image.owned_dirs)
            table[target] = self.volumes[name]
        return table


def _host_path(value: str, mounts: dict[str, Path], fs_root: Path) -> str:
    for target in sorted(mounts, key=len, reverse=True):
        if value == target or value.startswith(target.rstrip("/") + "/"):
            return str(mounts[target] / value[len(target):].lstrip("/"))
    return str(fs_root / value.lstrip("/"))  # a path the image does not have: root's


def service_env(service: dict, image: Image, mounts: dict[str, Path], fs_root: Path, home: Path,
                kafka: str, redis_url: str, prefix: str) -> dict[str, str]:
    env = {**image.env, **{k: str(v) for k, v in (service.get("environment") or {}).items()}}
    for key, value in list(env.items()):
        if value.startswith("/"):
            env[key] = _host_path(value, mounts, fs_root)
        elif value == "kafka:9092":
            env[key] = kafka
        elif value.startswith("redis://redis:6379"):
            env[key] = redis_url
        elif key.endswith("_PORT"):
            env[key] = str(free_port())
        elif key == "HEADWATER_BIND_HOST":
            env[key] = "127.0.0.1"
    env.setdefault("HEADWATER_STATE_DIR", _host_path("/data", mounts, fs_root))
    for key in HEALTH_PORT.values():
        env.setdefault(key, str(free_port()))
    env.update(HOME=str(home), PATH="/usr/bin:/bin", HEADWATER_TOPIC_PREFIX=prefix,
               HEADWATER_CONTENT_ENCODER="hashing", PYTHONDONTWRITEBYTECODE="1",
               HEADWATER_DATA_DIR=os.environ.get("HEADWATER_DATA_DIR", str(REPO.parent / "shared" / "datasets")))
    return env


def start(command: list[str], env: dict[str, str], uid: int, log: Path) -> subprocess.Popen:
    boot = (f"import site, sys; site.addsitedir({str(SITE)!r}); sys.path.insert(0, {str(REPO)!r}); "
            "from headwater.cli import main; sys.exit(main(sys.argv[1:]))")
    with open(log, "wb") as out:
        # -S: no Debian dist-packages (the image's Python has only its own site-packages;
        # Debian's _cffi_backend 1.15 ahead of the venv's cffi 2.x broke numba's import).
        return subprocess.Popen([str(PYTHON), "-S", "-c", boot, *command], env=env, cwd=env["HOME"],
                                stdout=out, stderr=subprocess.STDOUT, user=uid, group=uid,
                                extra_groups=[], start_new_session=True)


def _healthy(port: str) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2) as resp:
            return resp.status == 200
    except OSError:
        return False


@pytest.fixture
def sandbox():
    """A directory the service user can reach (pytest's own tmp dirs are root-only)."""
    path = Path(tempfile.mkdtemp(prefix="hw-compose-"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def compose():
    doc = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    services = {name: svc for name, svc in doc["services"].items() if svc.get("build") == "."}
    assert set(services) >= {"worker", "learner", "serving"}
    return services


def _run_services(tmp_path, services, dockerfile: str, kafka, redis_url, names):
    if not PYTHON.exists():
        pytest.skip(f"{PYTHON} (Debian's python3.11) is needed to run as a non-root user")
    if os.geteuid() != 0:
        pytest.skip("starting services as the image's user (uid 10001) needs root")
    image = Image.parse(dockerfile)
    engine = Engine(tmp_path, image)
    prefix = f"compose{int(time.time() * 1000) % 10**8}-"
    procs = {}
    for name in names:
        service = services[name]
        home = engine._make(tmp_path / "home" / name, owned=True)
        mounts = engine.mounts(service)
        env = service_env(service, image, mounts, tmp_path / "fs", home, kafka, redis_url, prefix)
        command = [str(c) for c in service["command"]]
        procs[name] = (start(command, env, image.uid, tmp_path / f"{name}.log"), env, command[0])
    return procs


def _stop(procs) -> None:
    for proc, _env, _cmd in procs.values():
        if proc.poll() is None:
            stop_pid(proc.pid, timeout=15, proc=proc)


def test_every_service_starts_as_the_image_user(compose, sandbox, kafka_bootstrap, redis_db):
    dockerfile = (REPO / "Dockerfile").read_text()
    procs = _run_services(sandbox, compose, dockerfile, kafka_bootstrap, redis_db,
                          ["worker", "learner", "serving"])
    try:
        for name, (proc, env, command) in procs.items():
            port = env[HEALTH_PORT[command]]

            def up(proc=proc, port=port, name=name):
                assert proc.poll() is None, (sandbox / f"{name}.log").read_text()[-3000:]
                return _healthy(port)

            wait_until(up, 120, what=f"{name} healthy as uid {Image.parse(dockerfile).uid}",
                       on_fail=lambda name=name: (sandbox / f"{name}.log").read_text()[-3000:])
        # the learner could create its model directory in the shared volume
        models = Path(procs["learner"][1]["HEADWATER_MODEL_STORE"])
        assert models.is_dir() and any(models.iterdir())
    finally:
        _stop(procs)
    for spec in compose["serving"].get("volumes", []):
        assert not (spec.startswith("models:") and spec.endswith(":ro")), \
            "serving keeps pins in the model store: its volume must be writable"


def test_it_catches_a_volume_the_image_does_not_own(compose, sandbox, kafka_bootstrap, redis_db):
    """The deployment bug this test exists for: the model store's volume root-owned."""
    dockerfile = (REPO / "Dockerfile").read_text().replace(" /models", "")
    procs = _run_services(sandbox, compose, dockerfile, kafka_bootstrap, redis_db, ["learner"])
    proc = procs["learner"][0]
    try:
        proc.wait(timeout=120)
    finally:
        _stop(procs)
    assert proc.returncode != 0
    assert "Permission denied" in (sandbox / "learner.log").read_text()


def test_the_replay_service_command_parses(compose):
    from headwater.cli import build_parser

    args = build_parser().parse_args([str(c) for c in compose["replay"]["command"]])
    assert args.command == "replay" and args.dataset == "movielens"
