"""What an operator runs: --version, check-config, JSON logs with rollout changes, and demo --serve with ctl."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import yaml

from server.metrics import build_version
from tests.deploy.support import DEPLOY, REPO, serving, shadowserve, stop
from tests.server.test_end_to_end import classifier_config
from tests.support.ports import free_port


def test_version_names_the_installed_build():
    result = shadowserve("--version")
    assert result.returncode == 0 and result.stdout == f"shadowserve {build_version()}\n"
    assert re.fullmatch(r"\d+\.\d+\.\d+", build_version())


def test_check_config_accepts_the_example_and_names_every_bad_key(tmp_path):
    result = shadowserve("check-config", "--skip-local", str(DEPLOY / "shadow.example.yaml"))
    assert result.returncode == 0, result.stderr
    assert "resnet: legacy mxnet, candidate triton, shadow 100%, serve 0%" in result.stdout

    missing_files = shadowserve("check-config", str(DEPLOY / "shadow.example.yaml"))
    assert missing_files.returncode == 2
    assert "models[0].legacy.symbol: Value error, file not found" in missing_files.stderr

    config = yaml.safe_load((DEPLOY / "shadow.example.yaml").read_text())
    config["models"][1]["shadow_percent"] = -1
    config["server"]["grpc_listen"] = "8001"
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(config))
    bad = shadowserve("check-config", "--skip-local", str(tmp_path / "bad.yaml"))
    assert bad.returncode == 2 and bad.stdout == ""
    assert "server.grpc_listen" in bad.stderr and "models[1].shadow_percent" in bad.stderr


def test_json_logs_one_event_per_line_with_rollout_changes(demo_models, tmp_path):
    config = classifier_config(demo_models, demo_models.faithful_torch)
    with serving(config, tmp_path, "--log-format", "json") as gateway:
        result = shadowserve("ctl", "--admin", gateway.admin, "set", "classifier", "--serve", "5", "--reason", "canary")
        assert result.returncode == 0, result.stdout + result.stderr
        deadline = time.monotonic() + 30
        while '"rollout_change"' not in gateway.log:
            assert time.monotonic() < deadline, gateway.log[-2000:]
            time.sleep(0.1)
    lines = [line for line in gateway.log.splitlines() if line.strip()]
    assert not [line for line in lines if not line.startswith("{")], gateway.log[-4000:]
    events = [json.loads(line) for line in lines]
    assert all({"time", "level", "logger"} <= event.keys() for event in events)
    change = next(event for event in events if event.get("event") == "rollout_change")
    assert change["model"] == "classifier" and change["new_serve_percent"] == 5 and change["source"] == "cli"


def test_a_runtime_warning_is_a_json_log_event_too():
    program = ("import warnings; from server.cli import configure_logging; configure_logging('INFO', 'json'); "
               "warnings.warn('a runtime says something')")
    result = subprocess.run([sys.executable, "-c", program], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    events = [json.loads(line) for line in result.stderr.splitlines()]
    assert [(event["level"], event["logger"]) for event in events] == [("WARNING", "py.warnings")]
    assert "UserWarning: a runtime says something" in events[0]["message"]


def test_demo_serve_tells_ctl_where_to_look_and_cleans_up_on_sigterm(tmp_path):
    admin = f"127.0.0.1:{free_port()}"
    env = {**os.environ, "SHADOWSERVE_ADMIN": admin}
    process = subprocess.Popen([sys.executable, "-m", "server.cli", "demo", "--serve", "--requests", "40"], cwd=REPO,
                               env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                               stderr=(tmp_path / "stderr").open("w"), text=True, start_new_session=True)
    output: list[str] = []
    try:
        deadline = time.monotonic() + 300
        while not any(line.startswith("serving until") for line in output):
            line = process.stdout.readline()
            assert line or process.poll() is None, "".join(output) + (tmp_path / "stderr").read_text()[-2000:]
            output.append(line)
            assert time.monotonic() < deadline, "".join(output)
        text = "".join(output)
        assert f"export SHADOWSERVE_ADMIN={admin}" in text
        folder = Path(re.search(r"models \(.*\) in (\S+) \.\.\.", text).group(1))
        assert folder.is_dir()

        status = subprocess.run([sys.executable, "-m", "server.cli", "ctl", "status"], cwd=REPO, env=env,
                                capture_output=True, text=True, timeout=60)
        assert status.returncode == 0, status.stdout + status.stderr
        assert re.search(r"^classifier\s+shadow\s+100\s+0\s", status.stdout, re.M), status.stdout

        process.send_signal(signal.SIGTERM)
        assert process.wait(60) == 0
        assert not folder.exists(), "the temporary folder outlives the demo"
    finally:
        stop(process)
    progress = (tmp_path / "stderr").read_text()
    assert "\r" not in progress, "a progress bar redrawn in place floods a log"
    lines = [line for line in progress.splitlines() if "requests" in line]
    assert lines == [f"{model}: {done}/40 requests" for model in ("classifier", "classifier_bgr") for done in (10, 20, 30, 40)]
