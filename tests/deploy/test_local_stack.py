"""The local stack of deploy/README.md, run by its documented commands: a real Triton (nvidia-pytriton)
serving the TorchScript port, the gateway shadowing it, and Prometheus evaluating the alert rules."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time

import yaml

from tests.deploy.support import DEPLOY, REPO
from tests.support.ports import free_port
from tests.support.prometheus import query, wait_for_value

STACK = DEPLOY / "local" / "stack.sh"


def documented_commands() -> list[str]:
    """The `deploy/local/stack.sh ...` lines of the local-stack section of deploy/README.md."""
    readme = (DEPLOY / "README.md").read_text()
    section = readme[readme.index("## Local stack"):]
    section = section[: section.find("\n## ", 4)]
    return re.findall(r"^(deploy/local/stack\.sh .+?)\s*(?:#.*)?$", section, re.M)


def test_the_local_stack_runs_as_documented(tmp_path):
    commands = documented_commands()
    assert [c.split()[1] for c in commands] == ["up", "traffic", "status", "down"], commands
    ports = {name: str(free_port()) for name in ("GRPC_PORT", "METRICS_PORT", "ADMIN_PORT", "TRITON_PORT", "PROMETHEUS_PORT")}
    env = {**os.environ, **ports, "STACK_DIR": str(tmp_path / "stack"), "PYTHON": sys.executable}
    prometheus = f"http://127.0.0.1:{ports['PROMETHEUS_PORT']}"

    def run(command: str, timeout: float = 600) -> str:
        result = subprocess.run(["bash", "-c", command], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
        assert result.returncode == 0, f"{command}\n{result.stdout}\n{result.stderr}\n" + logs()
        return result.stdout

    def logs() -> str:
        return "".join(f"--- {p.name}\n{p.read_text(errors='replace')[-1500:]}" for p in (tmp_path / "stack").glob("*.log"))

    up, traffic, status, down = commands
    try:
        assert "Prometheus on" in run(up)
        rules = query_rules(prometheus)
        expected = {rule["alert"] for group in yaml.safe_load((DEPLOY / "prometheus" / "shadowserve.rules.yml").read_text())["groups"]
                    for rule in group["rules"]}
        assert rules == expected, "Prometheus loaded every alert of deploy/prometheus"

        requests = int(re.search(r"traffic (\d+)", traffic).group(1))
        assert f"{requests} requests answered" in run(traffic)
        accounted = ('sum(shadowserve_comparisons_total{model="classifier"}) + '
                     'sum(shadowserve_shadow_skipped_total{model="classifier",reason!="sampled_out"})')
        wait_for_value(prometheus, accounted, float(requests), timeout_s=120)
        compared = query(prometheus, 'sum(shadowserve_comparisons_total{model="classifier"})')
        assert float(compared[0]["value"][1]) > 0, "the candidate on Triton answered"
        wait_for_value(prometheus, 'sum(shadowserve_comparisons_total{model="classifier",verdict!="match"})', 0.0)
        wait_for_value(prometheus, 'up{job="shadowserve",namespace="local",pod="gateway-0"}', 1.0)

        assert re.search(r"^classifier\s+shadow\s+100\s+0\s", run(status), re.M)
        assert not query(prometheus, 'ALERTS{alertname="ShadowserveGatewayDown"}')

        # A rollback with ctl (the address the stack printed) fires the rollback alert in Prometheus.
        run(f'"$PYTHON" -m server.cli ctl --admin 127.0.0.1:{ports["ADMIN_PORT"]} rollback classifier --reason drill')
        wait_for_value(prometheus, 'count(ALERTS{alertname="ShadowserveRollback",alertstate="firing",model="classifier"})',
                       1.0, timeout_s=60)
    finally:
        stopped = run(down)
    assert stopped.split() == ["prometheus:", "stopped", "gateway:", "stopped", "triton:", "stopped"]
    assert not list((tmp_path / "stack").glob("*.pid"))
    for port in ports.values():
        probe = subprocess.run([sys.executable, "-c", f"import socket; socket.create_connection(('127.0.0.1', {port}), 1)"],
                               capture_output=True)
        assert probe.returncode != 0, f"something still listens on {port}"


def query_rules(url: str) -> set[str]:
    import json
    import urllib.request

    deadline = time.monotonic() + 30
    while True:
        with urllib.request.urlopen(f"{url}/api/v1/rules", timeout=5) as reply:
            groups = json.load(reply)["data"]["groups"]
        names = {rule["name"] for group in groups for rule in group["rules"] if rule["type"] == "alerting"}
        if names or time.monotonic() > deadline:
            return names
        time.sleep(0.5)
