"""TLS and mTLS on the front and admin ports, the admin token, and TLS towards backends: real certificates,
a real `shadowserve serve` and real tritonclient clients."""

from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import tritonclient.grpc.aio as triton_aio
import yaml
from tritonclient.grpc import service_pb2 as pb
from tritonclient.utils import InferenceServerException

from protos import admin_pb2, admin_pb2_grpc
from server.admin import start_admin_server
from server.cli import main
from server.config import ServerConfig, load_config
from server.errors import ConfigError
from tests.support.certs import Certificates, make_certificates
from tests.support.gateway import LEGACY, X, GatewayProcess
from tests.support.kserve import Behaviour, scale_by, start_model_server

TOKEN = "s3cret-token"


def remote(url: str, tls: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"runtime": "remote", "url": url, "model": "m", **({"tls": tls} if tls else {})}


def write_config(tmp_path: Path, server: dict[str, Any], legacy: dict[str, Any],
                 candidate: dict[str, Any] | None = None) -> Path:
    ports = {"grpc_listen": "127.0.0.1:0", "metrics_listen": "127.0.0.1:0", "admin_listen": "127.0.0.1:0"}
    model = {"name": "m", "inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, 2]}],
             "outputs": [{"name": "y", "datatype": "FP32", "shape": [-1, 2]}], "legacy": legacy}
    if candidate is not None:
        model |= {"candidate": candidate, "shadow_percent": 100}
    path = tmp_path / "shadow.yaml"
    path.write_text(yaml.safe_dump({"server": {**ports, **server}, "models": [model]}, sort_keys=False))
    return path


async def infer(client: triton_aio.InferenceServerClient) -> bytes:
    tensor = triton_aio.InferInput("x", [1, 2], "FP32")
    tensor.set_data_from_numpy(X)
    return (await client.infer("m", [tensor], client_timeout=10)).as_numpy("y").tobytes()


def client_tls(certs: Certificates, with_cert: bool) -> dict[str, Any]:
    """tritonclient's TLS arguments: trust the test CA, and present the client certificate `with_cert`."""
    client_cert = {"private_key": str(certs.client_key), "certificate_chain": str(certs.client_cert)}
    return {"ssl": True, "root_certificates": str(certs.ca), **(client_cert if with_cert else {})}


def tls_client(port: int, certs: Certificates, with_cert: bool) -> triton_aio.InferenceServerClient:
    return triton_aio.InferenceServerClient(f"127.0.0.1:{port}", **client_tls(certs, with_cert))


async def refused(client: triton_aio.InferenceServerClient) -> str:
    async with client:
        with pytest.raises(InferenceServerException) as error:
            await infer(client)
    return error.value.status()


@pytest.fixture
def certs(tmp_path) -> Certificates:
    return make_certificates(tmp_path / "certs")


async def test_tls_front_and_mtls_admin_with_token(tmp_path, model_server, certs):
    legacy_url, _ = await model_server(Behaviour(scale_by(2.0)))
    candidate_url, _ = await model_server(Behaviour(scale_by(3.0)))
    token_file = tmp_path / "admin-token"
    token_file.write_text(TOKEN + "\n")
    served = {"cert_file": str(certs.server_cert), "key_file": str(certs.server_key)}
    admin_mtls = {**served, "client_ca_file": str(certs.ca)}
    config = write_config(tmp_path, {"tls": served, "admin_tls": admin_mtls, "admin_token_file": str(token_file)},
                          remote(legacy_url), remote(candidate_url))
    ctl_tls = ("--ca-file", str(certs.ca), "--cert-file", str(certs.client_cert), "--key-file", str(certs.client_key))
    gateway = GatewayProcess(config, client_tls=client_tls(certs, with_cert=False), ctl_args=ctl_tls)
    await gateway.start()
    try:
        async with gateway.client() as client:
            assert await infer(client) == LEGACY
        assert await refused(triton_aio.InferenceServerClient(f"127.0.0.1:{gateway.grpc_port}")) == \
            "StatusCode.UNAVAILABLE"

        right = {"SHADOWSERVE_ADMIN_TOKEN": TOKEN}
        assert (await gateway.ctl_json("status", "m", env=right))["pairs"][0]["shadow_percent"] == 100
        wrong_file = tmp_path / "wrong-token"
        wrong_file.write_text("not-the-token\n")
        for env, args in (({"SHADOWSERVE_ADMIN_TOKEN": "not-the-token"}, ()), ({}, ()),
                          (right, ("--token-file", str(wrong_file)))):
            result = await gateway.ctl_run(*args, "set", "m", "--serve", "100", env=env)
            assert result.returncode == 1 and "UNAUTHENTICATED" in result.stdout, result.stdout + result.stderr
        status = await gateway.ctl_json("--token-file", str(token_file), "status", "m")
        assert status["pairs"][0]["serve_percent"] == 0 and status["pairs"][0]["stage"] == "shadow"

        for ctl_args in ((), ctl_tls[:2]):  # plaintext, and TLS without a client certificate
            gateway.ctl_args = ctl_args
            result = await gateway.ctl_run("status", env=right)
            assert result.returncode == 1 and "UNAVAILABLE" in result.stdout, result.stdout + result.stderr
        gateway.ctl_args = ctl_tls

        await gateway.ctl("set", "m", "--serve", "100", env=right)
        assert (await gateway.pair(env=right))["serve_percent"] == 100

        token_file.write_text("rotated-token\n")  # read on every call: no restart
        assert (await gateway.ctl_run("status", env=right)).returncode == 1
        assert (await gateway.pair(env={"SHADOWSERVE_ADMIN_TOKEN": "rotated-token"}))["serve_percent"] == 100
    finally:
        await gateway.stop()
    assert gateway.process.returncode == 0, "".join(gateway.output)


@pytest.mark.parametrize("workers", [1, 2])
async def test_mtls_front_refuses_clients_without_certificate_and_follows_rotated_certificates(
        tmp_path, model_server, certs, workers):
    legacy_url, _ = await model_server(Behaviour(scale_by(2.0)))
    live = tmp_path / "live"  # what cert-manager would update in place
    shutil.copytree(certs.ca.parent, live)
    tls = {"cert_file": str(live / "server.pem"), "key_file": str(live / "server.key"),
           "client_ca_file": str(live / "test-ca.pem")}
    gateway = GatewayProcess(write_config(tmp_path, {"tls": tls, "workers": workers}, remote(legacy_url)),
                             client_tls=client_tls(certs, with_cert=True))
    await gateway.start()
    try:
        async with tls_client(gateway.grpc_port, certs, with_cert=True) as client:
            assert await infer(client) == LEGACY
        assert await refused(tls_client(gateway.grpc_port, certs, with_cert=False)) == "StatusCode.UNAVAILABLE"
        other = make_certificates(tmp_path / "other", "other-ca")  # a client signed by a CA the gateway does not trust
        assert await refused(tls_client(gateway.grpc_port, other, with_cert=True)) == "StatusCode.UNAVAILABLE"

        for name in ("server.pem", "server.key", "test-ca.pem"):  # rotation: every file from the other CA
            shutil.copy(other.ca.parent / name.replace("test-ca", "other-ca"), live / name)
        async with tls_client(gateway.grpc_port, other, with_cert=True) as client:
            assert await infer(client) == LEGACY
        assert await refused(tls_client(gateway.grpc_port, certs, with_cert=True)) == "StatusCode.UNAVAILABLE"
    finally:
        await gateway.stop()
    assert gateway.process.returncode == 0, "".join(gateway.output)


def server_credentials(certs: Certificates) -> grpc.ServerCredentials:
    """A backend that requires a client certificate from the gateway (mTLS)."""
    return grpc.ssl_server_credentials([(certs.server_key.read_bytes(), certs.server_cert.read_bytes())],
                                       root_certificates=certs.ca.read_bytes(), require_client_auth=True)


async def test_remote_legacy_and_triton_candidate_reached_over_mtls(tmp_path, certs):
    tensor = {"datatype": "FP32", "shape": [-1, 2]}
    metadata = pb.ModelMetadataResponse(name="m", inputs=[{"name": "x", **tensor}], outputs=[{"name": "y", **tensor}])
    legacy, legacy_url, _ = await start_model_server(
        "m", Behaviour(scale_by(2.0)), credentials=server_credentials(certs))
    candidate, candidate_url, calls = await start_model_server(
        "m", Behaviour(scale_by(3.0), metadata=metadata), credentials=server_credentials(certs))
    tls = {"ca_file": str(certs.ca), "cert_file": str(certs.client_cert), "key_file": str(certs.client_key)}
    gateway = GatewayProcess(write_config(tmp_path, {}, remote(legacy_url, tls),
                                          {**remote(candidate_url, tls), "runtime": "triton"}))
    try:
        await gateway.start()
        async with gateway.client() as client:
            assert await infer(client) == LEGACY
        assert (await gateway.pair())["has_candidate"]
        await gateway.ctl("set", "m", "--serve", "100")
        async with gateway.client() as client:
            assert await infer(client) == (X * 3).astype(np.float32).tobytes()
        assert calls.calls >= 1
    finally:
        await gateway.stop()
        await legacy.stop(0)
        await candidate.stop(0)


@pytest.mark.parametrize("server, legacy_tls, key", [
    ({"tls": {"cert_file": "missing.pem", "key_file": "server.key"}}, None,
     "server.tls.cert_file: Value error, file not found"),
    ({"admin_tls": {"cert_file": "server.pem", "key_file": "client.key"}}, None,
     "server.admin_tls: Value error, unusable TLS files"),
    ({"tls": {"cert_file": "server.pem", "key_file": "server.key", "client_ca_file": "server.key"}}, None,
     "server.tls: Value error, unusable TLS files"),
    ({"admin_token_file": "empty-token"}, None, "server.admin_token_file: Value error, empty token file"),
    ({}, {"cert_file": "client.pem"}, "models[0].legacy.tls: Value error, give cert_file and key_file together"),
    ({}, {"ca_file": "nowhere.pem"}, "models[0].legacy.tls.ca_file: Value error, file not found"),
])
def test_bad_tls_config_fails_at_start_naming_the_key(tmp_path, certs, server, legacy_tls, key):
    (certs.ca.parent / "empty-token").write_text("\n")
    path = write_config(certs.ca.parent, server, remote("127.0.0.1:1", legacy_tls))
    with pytest.raises(ConfigError, match=re.escape(key)):
        load_config(path)


async def test_admin_refuses_every_call_while_the_token_file_is_unreadable(tmp_path):
    token_file = tmp_path / "admin-token"
    token_file.write_text(TOKEN)
    server, port = await start_admin_server(None, ServerConfig(admin_listen="127.0.0.1:0", admin_token_file=token_file))
    token_file.unlink()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            with pytest.raises(grpc.aio.AioRpcError) as error:
                await admin_pb2_grpc.ShadowAdminStub(channel).Status(
                    admin_pb2.StatusRequest(), metadata=[("authorization", f"Bearer {TOKEN}")], timeout=5)
        assert error.value.code() == grpc.StatusCode.UNAUTHENTICATED
    finally:
        await server.stop(0)


@pytest.mark.parametrize("args, message", [
    (["--ca-file", "/nonexistent/ca.pem"], "file not found: /nonexistent/ca.pem"),
    (["--cert-file", __file__], "give cert_file and key_file together"),
    (["--token-file", "/nonexistent/token"], "--token-file /nonexistent/token: No such file or directory"),
])
def test_ctl_names_a_bad_tls_or_token_option(capsys, args, message):
    assert main(["ctl", "--admin", "127.0.0.1:1", *args, "status"]) == 2
    assert message in capsys.readouterr().err
