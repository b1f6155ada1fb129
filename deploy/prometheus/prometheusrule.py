"""Writes prometheusrule.yaml, the Prometheus Operator's wrapping of shadowserve.rules.yml.

shadowserve.rules.yml is the one source (promtool tests it; a plain Prometheus loads it as is).
Run after editing it: python deploy/prometheus/prometheusrule.py; `--check` fails when stale.
"""

from __future__ import annotations

import sys
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
SOURCE = HERE / "shadowserve.rules.yml"
TARGET = HERE / "prometheusrule.yaml"


class _Dumper(yaml.SafeDumper):
    pass


def _text(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _text)


def render() -> str:
    rules = yaml.safe_load(SOURCE.read_text())
    resource = {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PrometheusRule",
        "metadata": {"name": "shadowserve", "labels": {"app.kubernetes.io/name": "shadowserve"}},
        "spec": rules,
    }
    header = f"# Generated from {SOURCE.name} by {Path(__file__).name}; edit that file, not this one.\n"
    return header + yaml.dump(resource, Dumper=_Dumper, sort_keys=False, width=200)


def main(argv: list[str]) -> int:
    text = render()
    if "--check" in argv:
        if not TARGET.is_file() or TARGET.read_text() != text:
            print(f"{TARGET} is stale: run python deploy/prometheus/prometheusrule.py", file=sys.stderr)
            return 1
        return 0
    TARGET.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
