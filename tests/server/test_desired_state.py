"""The config file as shared, durable desired state: written by `ctl`, followed by every replica, kept across restarts.

The gateways here are real processes (`python -m server.cli serve`) sharing one config file,
driven by tritonclient and by `shadowserve ctl`; backends are real gRPC model servers.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
import shlex
from pathlib import Path

import pytest
import yaml

from server.config import parse_config
from server.desired_state import DesiredState, EditError, edit_percentages, read_only_reason, write_atomically
from tests.support.gateway import GatewayProcess, eventually
from tests.support.kserve import Behaviour, scale_by

AGREEING = 2.000001  # the candidate's factor: tells the sides apart, still within tolerance

CONFIG = """\
# one model pair, shared by every replica
server:
  grpc_listen: 127.0.0.1:0
  metrics_listen: 127.0.0.1:0
  admin_listen: 127.0.0.1:0
  config_poll_s: 0.2          # replicas follow edits within this
  max_unjudged_served: 10000  # these tests check routing: no legacy fallback while a busy engine judges late
models:
  - name: m                   # the name clients call
    inputs: [{name: x, datatype: FP32, shape: [-1, 2]}]
    outputs: [{name: y, datatype: FP32, shape: [-1, 2]}]
    legacy: {runtime: remote, url: "LEGACY_URL", model: m, timeout_s: 2}
    candidate: {runtime: remote, url: "CANDIDATE_URL", model: m, timeout_s: 2}
    shadow_percent: 100       # every request also goes to the candidate
    serve_percent: 0          # the candidate's share of answers
    guard: {window: 50, min_samples: 20, max_mismatch_rate: 0.1}
"""


def config_text(legacy_url: str, candidate_url: str, serve: int = 0) -> str:
    """The config with `serve` as a correct edit writes it: the number replaced, the comment in its column."""
    text = CONFIG.replace("LEGACY_URL", legacy_url).replace("CANDIDATE_URL", candidate_url)
    return re.sub(r"serve_percent: \d+ +#", lambda m: f"serve_percent: {serve}".ljust(len(m.group(0)) - 1) + "#", text)


def info_series(metrics: str, name: str) -> list[str]:
    """The label sets of `name` at 1."""
    return re.findall(rf"^{name}\{{(.*)\}} 1\.0$", metrics, re.M)


@pytest.fixture
async def backends(model_server):
    legacy_url, _ = await model_server(Behaviour(scale_by(2.0)))
    candidate_url, candidate = await model_server(Behaviour(scale_by(AGREEING)))
    return legacy_url, candidate_url, candidate


@pytest.fixture
async def gateways():
    started: list[GatewayProcess] = []

    async def start(config: Path, env: dict[str, str] | None = None) -> GatewayProcess:
        gateway = GatewayProcess(config, env)
        started.append(gateway)
        await gateway.start()
        return gateway

    yield start
    for gateway in started:
        with contextlib.suppress(ProcessLookupError):
            await gateway.stop()


KEYS = [f"user-{i}" for i in range(20)]


async def test_two_replicas_follow_a_ctl_change_and_a_restart_comes_back_in_it(tmp_path, backends, gateways):
    legacy_url, candidate_url, _ = backends
    path = tmp_path / "shadow.yaml"
    path.write_text(config_text(legacy_url, candidate_url))
    path.chmod(0o640)
    a, b = await gateways(path), await gateways(path)
    for gateway in (a, b):
        assert info_series(await gateway.metrics(), "shadowserve_rollout_info") == [
            'model="m",serve_percent="0",shadow_percent="100",stage="shadow"']

    reply = (await a.ctl_json("set", "m", "--serve", "100"))["pairs"][0]
    assert (reply["stage"], reply["serve_percent"]) == ("cutover", 100)
    assert reply["persistence"] == {"persisted": True, "path": str(path), "note": "", "hint": ""}
    assert path.read_text() == config_text(legacy_url, candidate_url, serve=100)  # comments and layout kept
    assert oct(path.stat().st_mode & 0o777) == oct(0o640)

    async def follows(gateway: GatewayProcess) -> bool:
        return (await gateway.pair())["serve_percent"] == 100

    await eventually(lambda: follows(b))
    digest = hashlib.sha256(path.read_bytes()).hexdigest()[:12]
    for gateway in (a, b):
        assert await gateway.sides(KEYS) == ["candidate"] * len(KEYS)
        status = await gateway.ctl_json("status", "--history")
        assert status["config_digest"] == digest
        assert status["pairs"][0]["persistence"]["persisted"] is True
        metrics = await gateway.metrics()
        assert info_series(metrics, "shadowserve_rollout_info") == [
            'model="m",serve_percent="100",shadow_percent="100",stage="cutover"']
        assert info_series(metrics, "shadowserve_config_info") == [f'digest="{digest}"']
    history_a = (await a.ctl_json("status", "--history"))["history"]
    history_b = (await b.ctl_json("status", "--history"))["history"]
    assert [(change["source"], change["new_stage"]) for change in history_a] == [("cli", "cutover")]  # no echo from the file
    assert [(change["source"], change["new_stage"]) for change in history_b] == [("file", "cutover")]

    await b.stop()
    await b.start()
    assert ((await b.pair())["stage"], (await b.pair())["serve_percent"]) == ("cutover", 100)
    assert await b.sides(KEYS) == ["candidate"] * len(KEYS)


async def test_a_guard_rollback_is_written_and_outlasts_a_restart_until_an_operator_changes_it(tmp_path, backends, gateways):
    legacy_url, candidate_url, candidate = backends
    path = tmp_path / "shadow.yaml"
    path.write_text(config_text(legacy_url, candidate_url, serve=50))
    a, b = await gateways(path), await gateways(path)
    keys = [f"k{i}" for i in range(400)]
    assert "candidate" in await a.sides(keys[:30])
    candidate.transform = scale_by(3.0)  # the candidate goes wrong during the canary
    for start in range(30, len(keys), 10):
        await a.sides(keys[start:start + 10])
        if (await a.pair())["stage"] == "rolled_back":
            break
    pair = await a.pair()
    assert (pair["stage"], pair["serve_percent"]) == ("rolled_back", 0)
    assert pair["last_rollback_reason"].startswith("mismatch_rate: ")
    assert path.read_text() == config_text(legacy_url, candidate_url, serve=0)  # every replica follows the file
    await eventually(lambda: _serves(b, 0))

    await a.stop()
    await a.start()
    pair = await a.pair()
    assert (pair["stage"], pair["serve_percent"]) == ("rolled_back", 0)
    assert pair["last_rollback_reason"].startswith("mismatch_rate: ")
    assert pair["persistence"]["persisted"] is True
    assert Path(pair["persistence"]["path"]).parent == tmp_path / ".shadowserve-state"
    assert await a.sides(KEYS) == ["legacy"] * len(KEYS)

    candidate.transform = scale_by(AGREEING)  # fixed; an operator serves it again, which ends the rollback
    reply = (await a.ctl_json("set", "m", "--serve", "100"))["pairs"][0]
    assert (reply["stage"], reply["persistence"]["persisted"]) == ("cutover", True)
    await a.stop()
    await a.start()
    assert ((await a.pair())["stage"], (await a.pair())["last_rollback_reason"]) == ("cutover", "")
    assert await a.sides(KEYS) == ["candidate"] * len(KEYS)


async def _serves(gateway: GatewayProcess, percent: float) -> bool:
    return (await gateway.pair())["serve_percent"] == percent


async def test_read_only_config_changes_the_running_gateway_and_prints_the_kubectl_patch(tmp_path, backends, gateways):
    legacy_url, candidate_url, _ = backends
    folder = tmp_path / "config"
    folder.mkdir()
    path = folder / "shadow.yaml"
    path.write_text(config_text(legacy_url, candidate_url))
    before = path.read_bytes()
    path.chmod(0o444)
    folder.chmod(0o555)
    try:
        gateway = await gateways(path, env={"SHADOWSERVE_CONFIGMAP": "shadowserve-config"})
        output = await gateway.ctl("set", "m", "--serve", "100")
        assert f"m: not persisted ({path} is a read-only file): this change lasts only until the gateway restarts" in output
        command = shlex.split(next(line for line in output.splitlines() if "kubectl patch" in line))
        assert command[:7] == ["kubectl", "patch", "configmap", "shadowserve-config", "--type", "merge", "-p"]
        assert json.loads(command[7]) == {"data": {"shadow.yaml": config_text(legacy_url, candidate_url, serve=100)}}
        assert path.read_bytes() == before
        assert await gateway.sides(KEYS) == ["candidate"] * len(KEYS)

        status = (await gateway.pair())["persistence"]
        assert (status["persisted"], status["note"]) == (False, f"{path} says shadow 100, serve 0")
        assert "not persisted" in await gateway.ctl("status")
        reply = (await gateway.ctl_json("set", "m", "--serve", "50"))["pairs"][0]
        assert (reply["stage"], reply["persistence"]["persisted"]) == ("canary", False)
        assert reply["persistence"]["hint"].startswith("kubectl patch configmap shadowserve-config --type merge -p ")
        reply = (await gateway.ctl_json("rollback", "m"))["pairs"][0]
        assert (reply["stage"], reply["persistence"]["persisted"]) == ("rolled_back", True)  # the file says serve 0

        path.chmod(0o644)  # as a kubelet swaps in a patched ConfigMap: the file's edit applies
        folder.chmod(0o755)
        write_atomically(path, config_text(legacy_url, candidate_url, serve=100))
        path.chmod(0o444)
        folder.chmod(0o555)
        await eventually(lambda: _serves(gateway, 100))
        await gateway.stop()
        await gateway.start()
        assert await gateway.sides(KEYS) == ["candidate"] * len(KEYS)
    finally:
        folder.chmod(0o755)
        path.chmod(0o644)


# -- the file edit and the state folder, without a gateway -----------------------------------

def test_the_edit_changes_only_the_numbers_and_adds_missing_keys_in_the_same_style():
    text = "models:\n  - name: a   # first\n    legacy: {runtime: remote}\n  - {name: b, serve_percent: 5}  # flow\n"
    assert edit_percentages(text, "a", {"shadow_percent": 100, "serve_percent": 0}) == (
        "models:\n  - name: a   # first\n    shadow_percent: 100\n    legacy: {runtime: remote}\n"
        "  - {name: b, serve_percent: 5}  # flow\n")
    assert edit_percentages(text, "b", {"shadow_percent": 12.5, "serve_percent": 25}) == (
        "models:\n  - name: a   # first\n    legacy: {runtime: remote}\n"
        "  - {name: b, serve_percent: 25, shadow_percent: 12.5}  # flow\n")


@pytest.mark.parametrize("text, message", [
    ("models:\n- name: a\n  shadow_percent: &p 10\n- name: b\n  shadow_percent: *p\n", "without changing other values"),
    ("models:\n- name: b\n", "no model named 'a'"),
    ("server: {}\n", "no 'models' list"),
    ("models: [", "not valid YAML"),
])
def test_an_edit_that_would_change_anything_else_is_refused(text, message):
    with pytest.raises(EditError, match=message):
        edit_percentages(text, "a", {"shadow_percent": 20, "serve_percent": 0})


def test_a_configmap_mount_is_never_written(tmp_path):
    # the layout kubelet makes: the key is a symlink through ..data to a timestamped folder
    (tmp_path / "..2026_01_01").mkdir()
    (tmp_path / "..2026_01_01" / "shadow.yaml").write_text("models: []\n")
    (tmp_path / "..data").symlink_to("..2026_01_01")
    (tmp_path / "shadow.yaml").symlink_to("..data/shadow.yaml")
    assert read_only_reason(tmp_path / "shadow.yaml") == "a ConfigMap or Secret mount"


def test_a_guard_rollback_is_restored_only_while_the_file_still_says_what_it_rolled_back(tmp_path):
    text = config_text("127.0.0.1:1", "127.0.0.1:2", serve=50)
    path = tmp_path / "shadow.yaml"
    path.write_text(text)
    state_dir = tmp_path / "state"

    def state(file_text: str) -> DesiredState:
        path.write_text(file_text)
        return DesiredState(path, parse_config(yaml.safe_load(file_text), "test"), state_dir=state_dir)

    state(text).record_rollback("m", "mismatch_rate: 12% > 10%")
    assert state(text).rollbacks_in_force() == {"m": "mismatch_rate: 12% > 10%"}
    assert state(text.replace("shadow_percent: 100", "shadow_percent: 90 ")).rollbacks_in_force() == {}
    assert state(text).rollbacks_in_force() == {}  # an operator's change dropped the record for good
