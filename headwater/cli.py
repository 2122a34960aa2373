"""The ``headwater`` command line.

Settings (:class:`core.settings.Settings`) come from ``HEADWATER_<NAME>`` environment
variables and ``--set NAME=VALUE`` (before or after the command); ``headwater settings``
lists them once, instead of repeating them in every command's help.
Exit codes: 0 ok, 1 failed or unhealthy, 2 bad usage or a bad setting, 130 interrupted.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from core.settings import Settings
from headwater.servers import StackError


def _set_option(parser: argparse.ArgumentParser, dest: str) -> None:
    parser.add_argument("--set", dest=dest, action="append", default=[], metavar="NAME=VALUE",
                        help="override one setting (repeatable); `headwater settings` lists them "
                             "with their HEADWATER_<NAME> environment variables")


def load_settings(args: argparse.Namespace) -> Settings:
    """Settings from the environment, overridden by every ``--set NAME=VALUE``.

    >>> load_settings(argparse.Namespace(set_global=["http_port=9001"], set_command=[])).http_port
    9001
    >>> load_settings(argparse.Namespace(set_global=["htp_port=1"], set_command=[]))
    Traceback (most recent call last):
    ...
    ValueError: unknown setting 'htp_port' in --set htp_port=1 (see `headwater settings`)
    """
    overrides: dict[str, str] = {}
    for item in [*getattr(args, "set_global", []), *getattr(args, "set_command", [])]:
        name, sep, value = item.partition("=")
        name = name.strip().lower().replace("-", "_")
        if not sep:
            raise ValueError(f"--set {item}: expected NAME=VALUE")
        if name not in Settings.model_fields:
            raise ValueError(f"unknown setting {name!r} in --set {item} (see `headwater settings`)")
        overrides[name] = value
    # a command's own flag for a setting (``serve --workers N``) is ``dest="setting_<name>"``
    for key, value in vars(args).items():
        if key.startswith("setting_") and value is not None:
            overrides[key[len("setting_"):]] = value
    return Settings(**overrides)


def build_parser() -> argparse.ArgumentParser:
    parent = argparse.ArgumentParser(add_help=False)
    _set_option(parent, "set_command")
    parser = argparse.ArgumentParser(prog="headwater", description=__doc__.splitlines()[0],
                                     epilog="Settings: `headwater settings`; override with "
                                            "HEADWATER_<NAME> or --set NAME=VALUE.")
    parser.add_argument("--version", action="version", version=f"headwater {_version()}")
    _set_option(parser, "set_global")
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
    p = add("learner", "Run the incremental learner service.")
    p.add_argument("--procs", type=int, default=None,
                   help="train one model with N data-parallel processes (torch.distributed, "
                        "gloo); default: the learner_procs setting (docs/scale-out.md)")
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
    p.add_argument("--as", dest="as_", choices=["clicks", "impressions"], default="clicks",
                   help="clicks: labelled click events (default); impressions: each rating an "
                        "impression (scored through serving when it answers, else logged "
                        "directly), ratings >= 4 a click 1-5 s later (the joined path)")
    p.add_argument("--serving", default=None, metavar="URL",
                   help="--as impressions: serving's URL (default: this stack's)")
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
    p.add_argument("action", choices=["get", "list"],
                   help="get: one entity's online features; list: the feature definition")
    p.add_argument("entity", nargs="?", help="get: user:ID or item:ID")
    p.add_argument("--json", action="store_true")
    p = add("lag", "Consumer lag per group, topic and partition.")
    p.add_argument("--watch", action="store_true")
    p.add_argument("--interval", type=float, default=2.0)
    p.add_argument("--json", action="store_true")
    p = add("models", "List, pin, unpin or roll back model versions (through serving's API).")
    p.add_argument("action", choices=["list", "pin", "unpin", "rollback"])
    p.add_argument("version", nargs="?")
    p.add_argument("--json", action="store_true")
    add("settings", "Print every setting with its environment variable and default.")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        settings = load_settings(args)
    except ValueError as exc:  # ours and pydantic's ValidationError name the setting
        print(f"headwater: invalid setting: {exc}", file=sys.stderr)
        return 2
    # --set reaches what reads the environment: the Kafka client factory, child processes
    for name in Settings.model_fields:
        if name in settings.model_fields_set:
            value = getattr(settings, name)
            value = value.get_secret_value() if hasattr(value, "get_secret_value") else value
            os.environ[f"HEADWATER_{name.upper()}"] = str(value)
    logging.basicConfig(level=settings.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("kafka", "aiokafka"):
        # Connection chatter at INFO drowns the services' own messages.
        logging.getLogger(noisy).setLevel(max(logging.WARNING, logging.getLogger().level))
    from headwater.commands import COMMANDS  # after logging is set up: it imports the services

    try:
        return COMMANDS[args.command](args, settings) or 0
    except StackError as exc:
        print(f"headwater: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # one line for people; the traceback at HEADWATER_LOG_LEVEL=DEBUG
        if settings.log_level.upper() == "DEBUG":
            raise
        print(f"headwater {args.command}: {type(exc).__name__}: {exc} "
              "(HEADWATER_LOG_LEVEL=DEBUG shows the traceback)", file=sys.stderr)
        return 1


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("headwater")
    except PackageNotFoundError:
        return "unknown (not installed)"
