"""`shadowserve` command line: serve, demo, ctl."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from server.errors import ConfigError


def _serve(args: argparse.Namespace) -> int:
    from server.config import load_config

    config = load_config(args.config)
    workers = args.workers or config.server.workers
    if workers > 1:
        from server.workers import run_workers

        return run_workers(config, Path(args.config), workers)
    from server import loop_load
    from server.app import Gateway

    loop_load.run(Gateway(config, config_path=Path(args.config)).serve_forever())
    return 0


def _demo(args: argparse.Namespace) -> int:
    from server import loop_load
    from server.demo import run_demo

    return loop_load.run(run_demo(requests=args.requests, legacy=args.legacy, serve=args.serve, workdir=args.workdir))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="shadowserve", description=__doc__)
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
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

    from server.ctl import add_parser as add_ctl

    add_ctl(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return args.run(args)
    except ConfigError as exc:
        print(f"shadowserve: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
