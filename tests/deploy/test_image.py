"""The image, without a Docker engine: deploy/Dockerfile's own steps, replayed into a fresh venv.

The build stage's COPY lines choose the sources, its protoc line compiles the protos, and its EXTRAS
are the extras installed (a plain, non-editable install, as `pip install shadowserve[EXTRAS]` in the
image). The gateway then starts from that venv, its HEALTHCHECK command passes, and it answers with
the legacy runtimes the image carries, while those it leaves out (torch) are absent.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import venv
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as triton_grpc

from server.demo.mxnet_models import synthetic_images
from tests.deploy.support import DEPLOY, REPO, serving
from tests.server.test_end_to_end import classifier_config

DOCKERFILE = (DEPLOY / "Dockerfile").read_text()


def build_stage() -> str:
    stages = re.split(r"^FROM ", DOCKERFILE, flags=re.M)
    return next(stage for stage in stages if " AS build" in stage.splitlines()[0])


def dockerfile_extras() -> str:
    return re.search(r"^ARG EXTRAS=(\S*)$", DOCKERFILE, re.M).group(1)


def json_instruction(name: str) -> list[str]:
    """An exec-form instruction (ENTRYPOINT, HEALTHCHECK ... CMD), continuation lines joined."""
    text = DOCKERFILE.replace("\\\n", " ")
    line = re.search(rf"^{name}\b.*$", text, re.M).group(0)
    return json.loads(line[line.index("["):])


def copy_build_context(target: Path) -> None:
    """The build stage's COPY lines, applied from the repository root (the build context)."""
    copies = re.findall(r"^COPY (?!--from)(.+)$", build_stage(), re.M)
    assert copies, "the build stage copies the sources"
    for line in copies:
        *sources, destination = line.split()
        for source in sources:
            origin = REPO / source
            where = target / (destination if destination not in ("./", ".") else "")
            if origin.is_dir():
                shutil.copytree(origin, where, ignore=shutil.ignore_patterns("__pycache__", "*_pb2*.py*"))
            else:
                where.mkdir(parents=True, exist_ok=True)
                shutil.copy(origin, where / origin.name)


def compile_protos(source: Path) -> None:
    """The build stage's protoc command (grpcio-tools as pinned in the `test` extra)."""
    command = re.search(r"python -m grpc_tools\.protoc [^&\\]+", build_stage()).group(0).split()
    protos = [str(p.relative_to(source)) for p in sorted((source / "protos").glob("*.proto"))]
    command = [sys.executable, *command[1:-1], *protos]  # the shell expanded protos/*.proto
    subprocess.run(command, cwd=source, check=True, timeout=120)


@pytest.fixture(scope="module")
def image_venv(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("image")
    source = root / "src"
    copy_build_context(source)
    compile_protos(source)
    environment = root / "venv"
    venv.create(environment, with_pip=True, clear=True)
    extras = dockerfile_extras()
    # pip's own cache makes this take seconds after the first run; the image installs the same set.
    installed = subprocess.run([environment / "bin" / "pip", "install", "-q", f"{source}[{extras}]"],
                               timeout=600, capture_output=True, text=True)
    assert installed.returncode == 0, installed.stderr[-3000:]
    return environment


def test_the_image_carries_the_extras_it_names_and_no_torch(image_venv):
    assert dockerfile_extras() == "mxnet,caffe", "the default image: legacy in process, the candidate on Triton"
    python = image_venv / "bin" / "python"
    probe = "import importlib.util as u; print(json.dumps({m: bool(u.find_spec(m)) for m in ('mxnet', 'cv2', 'torch')}))"
    found = subprocess.run([python, "-c", f"import json; {probe}"], capture_output=True, text=True, check=True)
    assert json.loads(found.stdout) == {"mxnet": True, "cv2": True, "torch": False}
    version = subprocess.run([image_venv / "bin" / "shadowserve", "--version"], capture_output=True, text=True)
    assert re.fullmatch(r"shadowserve \d+\.\d+\.\d+\n", version.stdout), version.stdout + version.stderr


def test_the_gateway_starts_from_the_image_venv_and_passes_its_healthcheck(image_venv, demo_models, tmp_path):
    assert json_instruction("ENTRYPOINT") == ["shadowserve"]
    entrypoint = [str(image_venv / "bin" / "shadowserve")]
    config = classifier_config(demo_models, demo_models.faithful_torch)
    config["models"][0].pop("candidate")  # torch is not in this image; the candidate would be on Triton
    config["models"][0]["shadow_percent"] = 0
    health = json_instruction("HEALTHCHECK")
    assert health[0] == "python" and health[1].endswith("/healthcheck.py")
    with serving(config, tmp_path, "--log-format", "json", command=entrypoint) as gateway:
        check = subprocess.run([image_venv / "bin" / "python", DEPLOY / "healthcheck.py", gateway.grpc],
                               capture_output=True, text=True, timeout=30)
        assert check.returncode == 0 and "SERVING" in check.stdout, check.stdout + check.stderr
        images, _ = synthetic_images(2, np.random.default_rng(5))
        with triton_grpc.InferenceServerClient(gateway.grpc) as client:
            tensor = triton_grpc.InferInput("image", [2, 3, 32, 32], "FP32")
            tensor.set_data_from_numpy(images)
            result = client.infer("classifier", [tensor]).as_numpy("probabilities")
        assert result.shape == (2, 6) and np.allclose(result.sum(axis=1), 1, atol=1e-5)
        lines = [line for line in gateway.log.splitlines() if line.strip()]
        assert lines and all(json.loads(line)["level"] for line in lines), "--log-format json: one object a line"
    refused = subprocess.run([image_venv / "bin" / "python", DEPLOY / "healthcheck.py", gateway.grpc],
                             capture_output=True, text=True, timeout=30)
    assert refused.returncode == 1 and "UNAVAILABLE" in refused.stderr


def test_check_config_in_the_image_names_the_extra_a_torch_candidate_needs(image_venv, demo_models, tmp_path):
    path = tmp_path / "shadow.yaml"
    path.write_text(json.dumps(classifier_config(demo_models, demo_models.faithful_torch)))
    result = subprocess.run([image_venv / "bin" / "shadowserve", "check-config", str(path)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "models[0].candidate.runtime: 'torch' is not installed here: pip install 'shadowserve[torch]'" in result.stderr
    assert "legacy" not in result.stderr, "mxnet is in the image"
