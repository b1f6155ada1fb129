"""Bad config fails at start-up, naming the file and the key; good config loads with defaults."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from server.config import load_config
from server.errors import ConfigError

TENSORS = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, 4]}],
           "outputs": [{"name": "y", "datatype": "FP32", "shape": [-1, 4]}]}


def write(tmp_path: Path, data) -> Path:
    path = tmp_path / "shadow.yaml"
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return path


def pair(**overrides) -> dict:
    return {"name": "m", **TENSORS, "legacy": {"runtime": "remote", "url": "127.0.0.1:1", "model": "m"}, **overrides}


def test_valid_config_resolves_model_files_relative_to_the_config(tmp_path):
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "net-symbol.json").write_text("{}")
    (tmp_path / "models" / "net-0000.params").write_bytes(b"")
    legacy = {"runtime": "mxnet", "symbol": "models/net-symbol.json", "params": "models/net-0000.params"}
    config = load_config(write(tmp_path, {"models": [pair(legacy=legacy, shadow_percent=0)]}))
    assert config.models[0].legacy.symbol == tmp_path / "models" / "net-symbol.json"
    assert config.server.grpc_listen == "0.0.0.0:8001" and config.server.admin_listen == "127.0.0.1:8003"
    assert config.models[0].atol == 1e-5 and config.models[0].legacy.timeout_s == 10.0


@pytest.mark.parametrize(
    "models, server, key, problem",
    [
        ([pair(shadow_percent=150, candidate={"runtime": "remote", "url": "h:1", "model": "c"})], {},
         "models[0].shadow_percent", "less than or equal to 100"),
        ([pair(legacy={"runtime": "caffe2"})], {}, "models[0].legacy", "'caffe2'"),
        ([pair(legacy={"runtime": "mxnet", "symbol": "missing.json", "params": "missing.params"})], {},
         "models[0].legacy.symbol", "file not found"),
        ([pair(inputs=[{"name": "x", "datatype": "FLOAT", "shape": [1]}])], {}, "models[0].inputs[0].datatype", "'FP32'"),
        ([pair(inputs=[{"name": "x", "datatype": "FP32", "shape": [0]}])], {}, "models[0].inputs[0].shape", "positive or -1"),
        ([pair(shadow_percent=10)], {}, "models[0]", "need a candidate backend"),
        ([pair(), pair()], {}, "models", "duplicate model names: ['m']"),
        ([pair(surprise=1)], {}, "models[0].surprise", "Extra inputs are not permitted"),
        ([pair(circuit_breaker={"open_s": 5, "max_open_s": 1})], {}, "models[0].circuit_breaker",
         "max_open_s (1) must not be below open_s (5)"),
        ([pair(circuit_breaker={"failures": 0})], {}, "models[0].circuit_breaker.failures", "greater than or equal to 1"),
        ([pair()], {"grpc_listen": "8001"}, "server.grpc_listen", "expected HOST:PORT"),
        ([pair()], {"shed_shadow_from_loop_busy": 0}, "server.shed_shadow_from_loop_busy", "greater than 0"),
        ([pair()], {"shed_shadow_from_loop_busy": 1.5}, "server.shed_shadow_from_loop_busy", "less than or equal to 1"),
        ([pair()], {"admin_listen": "0.0.0.0:8003"}, "server", "admin_allow_remote"),
        ([pair(legacy={"runtime": "remote", "url": "h:1", "model": "m", "tensor_names": {"z": "INPUT__0"}})], {},
         "models[0]", "legacy.tensor_names maps undeclared tensors: ['z']"),
    ],
)
def test_bad_config_names_the_file_and_key(tmp_path, models, server, key, problem):
    path = write(tmp_path, {"server": server, "models": models})
    with pytest.raises(ConfigError) as failure:
        load_config(path)
    text = str(failure.value)
    assert text.startswith(f"{path}: invalid configuration")
    line = next((line for line in text.splitlines() if line.strip().startswith(key + ":")), None)
    assert line is not None, text
    assert problem in line, text


def test_admin_port_may_be_exposed_only_on_purpose(tmp_path):
    path = write(tmp_path, {"server": {"admin_listen": "0.0.0.0:8003", "admin_allow_remote": True}, "models": [pair()]})
    assert load_config(path).server.admin_listen == "0.0.0.0:8003"


@pytest.mark.parametrize("text, problem", [("models: [", "not valid YAML"), ("- just a list", "expected a mapping")])
def test_unparsable_files(tmp_path, text, problem):
    with pytest.raises(ConfigError, match=problem):
        load_config(write(tmp_path, text))


def test_serve_exits_non_zero_naming_the_key(tmp_path):
    path = write(tmp_path, {"models": [pair(atol=-1)]})
    result = subprocess.run([sys.executable, "-m", "server.cli", "serve", "--config", str(path)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert str(path) in result.stderr and "models[0].atol" in result.stderr

    missing = subprocess.run([sys.executable, "-m", "server.cli", "serve", "--config", str(tmp_path / "nope.yaml")],
                             capture_output=True, text=True, timeout=60)
    assert missing.returncode == 2 and "nope.yaml: cannot read config" in missing.stderr


def test_the_shipped_example_is_valid_but_for_its_model_files():
    example = Path(__file__).parents[2] / "deploy" / "shadow.example.yaml"
    with pytest.raises(ConfigError) as failure:
        load_config(example)
    problems = [line.strip() for line in str(failure.value).splitlines()[1:]]
    assert problems and all("file not found" in line for line in problems), problems
