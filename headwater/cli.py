"""The ``headwater`` command line.

Every setting of :class:`headwater.settings.Settings` is also a ``--flag`` on every
command (generated from the one declaration); flags override ``HEADWATER_*`` variables.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable
from pathlib import Path

from headwater.servers import StackError
from headwater.settings import Settings


def _settings_parent() -> argparse.ArgumentParser:
    parent = argparse.ArgumentParser(add_help=False)
    group = parent.add_argument_group("settings (also HEADWATER_<NAME> environment variables)")
    for name, fld in Settings.model_fields.items():
        group.add_argument(f"--{name.replace('_', '-')}", dest=f"setting_{name}", default=None,
                           metavar=name.upper(), help=fld.description)
    return parent


def load_settings(args: argparse.Namespace) -> Settings:
    overrides = {k[len("setting_"):]: v for k, v in vars(args).items()
                 if k.startswith("setting_") and v is not None}
    return Settings(**overrides)


COMMANDS: dict[str, Callable[[argparse.Namespace, Settings], int]] = {}


def command(name: str):
    def register(fn):
        COMMANDS[name] = fn
        return fn
    return register


def build_parser() -> argparse.ArgumentParser:
    parent = _settings_parent()
    parser = argparse.ArgumentParser(prog="headwater", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name, help_, **kw):
        return sub.add_parser(name, help=help_, description=help_, parents=[parent], **kw)

    p = add("up", "Start the embedded stack (broker, Redis, worker, learner, serving).")
    p.add_argument("--only", default=None, help="comma-separated subset of worker,learner,serve")
    p = add("down", "Stop the embedded stack started by `headwater up` (kept state stays).")
    p.add_argument("--purge", action="store_true",
                   help="also wipe Redis data, the model store and positions (= headwater reset)")
    add("reset", "Stop the stack and wipe every piece of kept state (Redis, model store, positions).")
    p = add("status", "Every service's health, addresses, model version, rows trained.")
    p.add_argument("--json", action="store_true")
    add("worker", "Run the Faust worker (clicks, items, audit agents).")
    add("learner", "Run the incremental learner service.")
    p = add("serve", "Run the serving process (scoring, ops API, dashboard).")
    p.add_argument("--workers", dest="setting_serve_workers", default=None, metavar="N",
                   help="serving processes sharing the port (= HEADWATER_SERVE_WORKERS); "
                        "SIGHUP restarts them one at a time")
    p = add("replay", "Replay a dataset into Kafka in event-time order.")
    p.add_argument("dataset", choices=["movielens"])
    p.add_argument("--path", type=Path, default=None, help="dataset directory (both layouts)")
    p.add_argument("--rate", type=float, default=0.0, help="events per second; 0 = as fast as possible")
    p.add_argument("--limit", type=int, default=0, help="stop after N click events")
    p.add_argument("--batch", type=int, default=500, help="events per Kafka message (envelope)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--wait-items", type=float, default=120.0,
                   help="seconds to wait for item codes before the clicks (0: don't wait)")
    p.add_argument("--live", action="store_true",
                   help="stamp each click with the time it is sent, as a live producer would "
                        "(default: the dataset's own timestamps)")
    p = add("produce", "Produce events from a file (JSON lines, JSON array, or audit text).")
    p.add_argument("kind", choices=["clicks", "items", "audit"])
    p.add_argument("--file", type=Path, required=True)
    p.add_argument("--host", default=None, help="audit: host name (key); default: this host")
    p = add("ship-audit", "Tail an auditd log into the audit topic, keyed by host.")
    p.add_argument("path", type=Path)
    p.add_argument("--host", default=None)
    p.add_argument("--follow", action="store_true")
    p.add_argument("--state", type=Path, default=None, help="position file (default under state dir)")
    p = add("features", "Online features as served.")
    p.add_argument("action", choices=["get"])
    p.add_argument("entity", help="user:ID or item:ID")
    p.add_argument("--json", action="store_true")
    p = add("lag", "Consumer lag per group, topic and partition.")
    p.add_argument("--watch", action="store_true")
    p.add_argument("--interval", type=float, default=2.0)
    p.add_argument("--json", action="store_true")
    p = add("models", "List, pin or roll back model versions (through serving's API).")
    p.add_argument("action", choices=["list", "pin", "rollback"])
    p.add_argument("version", nargs="?")
    p.add_argument("--json", action="store_true")
    add("settings", "Print every setting with its environment variable and default.")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        settings = load_settings(args)
    except Exception as exc:  # pydantic's ValidationError names the setting
        print(f"headwater: invalid setting: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(level=settings.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("kafka", "aiokafka"):
        # Connection chatter at INFO drowns the services' own messages.
        logging.getLogger(noisy).setLevel(max(logging.WARNING, logging.getLogger().level))
    from headwater import commands  # noqa: F401 - registers the command functions

    try:
        return COMMANDS[args.command](args, settings) or 0
    except StackError as exc:
        print(f"headwater: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


def print_json(obj) -> None:
    print(json.dumps(obj, indent=2, default=str, sort_keys=True))
