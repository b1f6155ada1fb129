"""`shadowserve` command line: serve, demo, ctl, check-config."""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import sys
from pathlib import Path

from server.errors import ConfigError


def _serve(args: argparse.Namespace) -> int:
    from server.config import load_config
    from server.workers import run_workers

    config = load_config(args.config)
    return run_workers(config, Path(args.config), args.workers or config.server.workers, args.log_level)


def _demo(args: argparse.Namespace) -> int:
    from server import loop_load
    from server.demo import run_demo

    return loop_load.run(run_demo(requests=args.requests, legacy=args.legacy, serve=args.serve, workdir=args.workdir))


# In-process runtimes: the frameworks each can run on (any one will do); the extra of the same name installs them.
RUNTIME_FRAMEWORKS = {"mxnet": ("mxnet",), "torch": ("torch",), "caffe": ("caffe", "cv2")}


def _runtime_missing(runtime: str) -> bool:
    import importlib.util

    frameworks = RUNTIME_FRAMEWORKS.get(runtime, ())
    return bool(frameworks) and all(importlib.util.find_spec(name) is None for name in frameworks)


def _check_config(args: argparse.Namespace) -> int:
    from server.config import load_config

    config = load_config(args.file, check_files=not args.skip_local)
    missing = [] if args.skip_local else [
        f"  models[{index}].{role}.runtime: {backend.runtime!r} is not installed here: "
        f"pip install 'shadowserve[{backend.runtime}]'"
        for index, model in enumerate(config.models)
        for role, backend in (("legacy", model.legacy), ("candidate", model.candidate))
        if backend is not None and _runtime_missing(backend.runtime)
    ]
    if missing:
        raise ConfigError(f"{args.file}: runtimes missing\n" + "\n".join(missing))
    print(f"{args.file}: valid")
    for model in config.models:
        candidate = model.candidate.runtime if model.candidate else "none"
        print(f"  {model.name}: legacy {model.legacy.runtime}, candidate {candidate}, "
              f"shadow {model.shadow_percent:g}%, serve {model.serve_percent:g}%")
    return 0


class JsonFormatter(logging.Formatter):
    """One JSON object per line. A message that is itself a JSON object (a rollout change) is merged in."""

    def format(self, record: logging.LogRecord) -> str:
        event: dict = {
            "time": datetime.datetime.fromtimestamp(record.created, datetime.timezone.utc).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "pid": record.process,
        }
        message = record.getMessage()
        try:
            fields = json.loads(message) if message.startswith("{") else None
        except ValueError:
            fields = None
        if isinstance(fields, dict):
            event.update((key, value) for key, value in fields.items() if key not in event)
        else:
            event["message"] = message
        if record.exc_info:
            event["exception"] = self.formatException(record.exc_info)
        return json.dumps(event, default=str)


def configure_logging(level: str = "INFO", log_format: str | None = None) -> None:
    """Logging for this process; `log_format` defaults to $SHADOWSERVE_LOG_FORMAT, else "text".

    The choice is exported in $SHADOWSERVE_LOG_FORMAT so processes the gateway starts log alike.
    """
    log_format = log_format or os.environ.get("SHADOWSERVE_LOG_FORMAT") or "text"
    os.environ["SHADOWSERVE_LOG_FORMAT"] = log_format
    handler = logging.StreamHandler()
    if log_format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=level, handlers=[handler], force=True)
    logging.captureWarnings(True)  # a runtime's warning is a log event like any other, in the same format


def build_parser() -> argparse.ArgumentParser:
    from server import build_version

    parser = argparse.ArgumentParser(prog="shadowserve", description=__doc__)
    parser.add_argument("--version", action="version", version=f"shadowserve {build_version()}")
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    parser.add_argument("--log-format", choices=["text", "json"], default=None,
                        help="text, or json: one JSON object per line (default: env SHADOWSERVE_LOG_FORMAT, else text)")
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="run the gateway from a config file")
    serve.add_argument("--config", required=True, help="YAML config file")
    serve.add_argument("--workers", type=int, default=0, help="worker processes sharing the port (default: server.workers)")
    serve.set_defaults(run=_serve)

    demo = commands.add_parser("demo", help="build small real models and shadow them end to end")
    demo.add_argument("--requests", type=int, default=2000, help="requests per model pair")
    demo.add_argument("--legacy", choices=["mxnet", "caffe"], default="mxnet", help="legacy runtime of the demo")
    demo.add_argument("--serve", action="store_true", help="keep serving after the summary until Ctrl-C")
    demo.add_argument("--workdir", default=None, help="where model files go (default: a temporary folder)")
    demo.set_defaults(run=_demo)

    check = commands.add_parser(
        "check-config", help="validate a config file as `serve` would (keys, model files, installed runtimes), then exit")
    check.add_argument("file", help="YAML config file")
    check.add_argument("--skip-local", action="store_true",
                       help="check keys and values only: the model files and runtimes are another machine's")
    check.set_defaults(run=_check_config)

    from server.ctl import add_parser as add_ctl

    add_ctl(commands)
    from server.insight.cli import add_parser as add_insight

    add_insight(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure_logging(args.log_level, args.log_format)
    try:
        return args.run(args)
    except ConfigError as exc:
        print(f"shadowserve: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
