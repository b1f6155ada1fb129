"""Configuration as validated data: one YAML file, checked entirely at start-up."""

from __future__ import annotations

import ipaddress
import socket
import ssl
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from server.errors import ConfigError
from server.tensors import V2_DATATYPES

V2Datatype = Literal[V2_DATATYPES]  # type: ignore[valid-type]


def _existing_file(path: Path, info: ValidationInfo) -> Path:
    base_dir = (info.context or {}).get("base_dir")
    if base_dir is not None and not path.is_absolute():
        path = Path(base_dir) / path
    if (info.context or {}).get("check_files", True) and not path.is_file():
        raise ValueError(f"file not found: {path}")
    return path


ExistingFile = Annotated[Path, AfterValidator(_existing_file)]


def _token_file(path: Path, info: ValidationInfo) -> Path:
    path = _existing_file(path, info)
    if (info.context or {}).get("check_files", True):
        try:
            token = path.read_text().strip()
        except OSError as exc:
            raise ValueError(f"cannot read {path}: {exc.strerror}") from None
        if not token:
            raise ValueError(f"empty token file: {path}")
    return path


TokenFile = Annotated[Path, AfterValidator(_token_file)]


def _listen_address(value: str) -> str:
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"expected HOST:PORT, got {value!r}")
    return value


ListenAddress = Annotated[str, AfterValidator(_listen_address)]


def host_port(listen: str) -> tuple[str, int]:
    """HOST:PORT (validated by ListenAddress) split for a socket bind; IPv6 brackets removed."""
    host, _, port = listen.rpartition(":")
    return host.strip("[]"), int(port)


def address_family(host: str) -> socket.AddressFamily:
    """The socket family that binds `host` (as host_port returns it)."""
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def is_loopback(listen: str) -> bool:
    host = host_port(listen)[0]
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def check_tls_files(cert_file: Path | None, key_file: Path | None, ca_file: Path | None) -> None:
    """ValueError unless the files hold a PEM certificate chain with its unencrypted key, and a PEM CA bundle."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    try:
        if cert_file is not None:
            context.load_cert_chain(cert_file, key_file, password=b"")
        if ca_file is not None:
            context.load_verify_locations(ca_file)
    except (ssl.SSLError, OSError) as exc:
        raise ValueError(f"unusable TLS files: {exc}") from None


class ListenTLSConfig(Strict):
    """TLS on a port the gateway serves. The files are read again on the first handshake after they change."""

    cert_file: ExistingFile = Field(description="PEM certificate chain the port presents")
    key_file: ExistingFile = Field(description="PEM private key of cert_file")
    client_ca_file: ExistingFile | None = Field(
        None, description="PEM CA bundle; when set, clients must present a certificate it signed (mTLS)")

    @model_validator(mode="after")
    def _usable(self, info: ValidationInfo) -> "ListenTLSConfig":
        if (info.context or {}).get("check_files", True):
            check_tls_files(self.cert_file, self.key_file, self.client_ca_file)
        return self


class ChannelTLSConfig(Strict):
    """TLS towards a backend. The files are read when the backend is connected: rotating them needs a restart."""

    ca_file: ExistingFile | None = Field(None, description="PEM CA bundle that signed the backend's certificate; "
                                         "default: the system's roots")
    cert_file: ExistingFile | None = Field(None, description="PEM client certificate, for a backend that wants mTLS")
    key_file: ExistingFile | None = Field(None, description="PEM private key of cert_file")

    @model_validator(mode="after")
    def _usable(self, info: ValidationInfo) -> "ChannelTLSConfig":
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("give cert_file and key_file together")
        if (info.context or {}).get("check_files", True):
            check_tls_files(self.cert_file, self.key_file, self.ca_file)
        return self


class TensorConfig(Strict):
    """A tensor the pair exposes to clients."""

    name: str = Field(min_length=1)
    datatype: V2Datatype
    shape: list[int] = Field(min_length=0, description="dimensions; -1 marks a variable one")
    class_scores: bool = Field(False, description="output only: compare top-1 and top-k along the last axis")

    @field_validator("shape")
    @classmethod
    def _dims(cls, shape: list[int]) -> list[int]:
        if any(dim < -1 or dim == 0 for dim in shape):
            raise ValueError("dimensions must be positive or -1")
        return shape


class BackendConfig(Strict):
    """Settings every runtime shares."""

    timeout_s: float = Field(10.0, gt=0, description="deadline of one call to this backend")
    tensor_names: dict[str, str] = Field(
        default_factory=dict, description="pair tensor name -> this backend's tensor name"
    )


class MXNetConfig(BackendConfig):
    runtime: Literal["mxnet"]
    symbol: ExistingFile
    params: ExistingFile
    input_names: list[str] = Field(default_factory=lambda: ["data"])
    context: str = Field("cpu", pattern=r"^(cpu|gpu\(\d+\))$")
    threads: int = Field(1, ge=1, le=64, description="inference threads for this backend")


class TorchConfig(BackendConfig):
    runtime: Literal["torch"]
    path: ExistingFile = Field(description="TorchScript (torch.jit.save) or torch.export (.pt2) program")
    device: str = "cpu"
    threads: int = Field(1, ge=1, le=64)


class RemoteConfig(BackendConfig):
    runtime: Literal["remote"]
    url: str = Field(min_length=3, description="HOST:PORT of a KServe v2 gRPC endpoint")
    model: str = Field(min_length=1)
    version: str = ""
    tls: ChannelTLSConfig | None = Field(None, description="connect over TLS; null: plaintext")
    shadow_calls: Literal["unary", "stream"] = Field(
        "unary", description="how the shadow engine calls this candidate: a ModelInfer call each, or messages on one "
        "long-lived ModelStreamInfer stream (less CPU per call; unary where the server serves no streams)")


class TritonConfig(RemoteConfig):
    runtime: Literal["triton"]  # type: ignore[assignment]
    shadow_calls: Literal["unary", "stream"] = "stream"  # every Triton server serves streams


class CaffeConfig(BackendConfig):
    runtime: Literal["caffe"]
    prototxt: ExistingFile
    caffemodel: ExistingFile
    executor: Literal["auto", "pycaffe", "opencv"] = "auto"
    mean_values: list[float] | None = Field(None, description="per-channel mean subtracted from the input")
    mean_file: ExistingFile | None = Field(None, description=".binaryproto mean blob subtracted from the input")
    raw_scale: float | None = Field(None, description="multiplier applied before mean subtraction")
    input_scale: float | None = Field(None, description="multiplier applied after mean subtraction")
    channel_swap: list[int] | None = Field(None, description="channel order, e.g. [2, 1, 0] for RGB->BGR")
    threads: int = Field(1, ge=1, le=64)

    @model_validator(mode="after")
    def _one_mean(self) -> "CaffeConfig":
        if self.mean_values is not None and self.mean_file is not None:
            raise ValueError("give either mean_values or mean_file, not both")
        return self


AnyBackend = Annotated[
    Union[MXNetConfig, TorchConfig, RemoteConfig, TritonConfig, CaffeConfig],
    Field(discriminator="runtime"),
]


class GuardConfig(Strict):
    """Automatic rollback thresholds, judged over the recent window of shadowed requests."""

    window: int = Field(200, ge=10, le=100_000, description="most recent shadowed requests judged")
    min_samples: int = Field(50, ge=1, description="no verdict before this many samples")
    max_mismatch_rate: float | None = Field(None, ge=0, le=1)
    min_top1_agreement: float | None = Field(None, ge=0, le=1)
    max_error_rate: float | None = Field(None, ge=0, le=1, description="candidate errors and timeouts")
    max_p99_latency_s: float | None = Field(None, gt=0)


class CircuitBreakerConfig(Strict):
    """When to stop calling a failing candidate, and how long to wait before probing it again."""

    failures: int = Field(5, ge=1, description="candidate failures in a row that open the circuit")
    open_s: float = Field(1.0, gt=0, description="pause before the first probe call")
    max_open_s: float = Field(30.0, gt=0, description="longest pause; each failed probe doubles it up to this")

    @model_validator(mode="after")
    def _ordered(self) -> "CircuitBreakerConfig":
        if self.max_open_s < self.open_s:
            raise ValueError(f"max_open_s ({self.max_open_s:g}) must not be below open_s ({self.open_s:g})")
        return self


def _config_relative(path: Path, info: ValidationInfo) -> Path:
    base_dir = (info.context or {}).get("base_dir")
    return Path(base_dir) / path if base_dir is not None and not path.is_absolute() else path


class CaptureConfig(Strict):
    """Opt-in capture of compared requests (inputs and both answers) for `shadowserve replay` and `diagnose`.

    Mismatches are captured, matches only as a small control sample. Files are readable by the
    owner only: inputs may hold user data.
    """

    dir: Annotated[Path, AfterValidator(_config_relative)] = Field(
        description="folder of the records, created mode 0700; one model per folder; relative to the config file")
    max_bytes: int = Field(1_000_000_000, ge=1, description="records beyond this size delete the oldest ones")
    max_per_second: float = Field(10, gt=0, description="records written per second at most (bursts up to this many)")
    matches_percent: float = Field(1, ge=0, le=100, description="share of matching requests captured as controls")


class ModelPairConfig(Strict):
    """One model clients call, served by `legacy` and compared against `candidate`."""

    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9_.\-]+$")
    inputs: list[TensorConfig] = Field(min_length=1)
    outputs: list[TensorConfig] = Field(min_length=1)
    legacy: AnyBackend
    candidate: AnyBackend | None = None
    shadow_percent: float = Field(0.0, ge=0, le=100)
    serve_percent: float = Field(0.0, ge=0, le=100)
    atol: float = Field(1e-5, ge=0, description="absolute tolerance of a match")
    rtol: float = Field(1e-4, ge=0, description="relative tolerance of a match")
    top_k: int = Field(5, ge=1, description="k of the top-k overlap of class-score outputs")
    max_batch_size: int | None = Field(
        None, ge=1, description="largest first dimension (the batch) of any input a client may send; null: no limit")
    max_tensor_elements: int | None = Field(
        None, ge=1, description="most elements one input tensor may hold; null: only max_message_bytes limits it")
    max_concurrent_requests: int = Field(
        1024, ge=1, description="requests of this model in flight at once, per worker process; beyond, "
        "RESOURCE_EXHAUSTED")
    expose_backend_details: bool = Field(
        False, description="ModelMetadata and ModelConfig name the backends (runtimes, candidate address) and the "
        "stage; false shows clients only what a Triton server would")
    routing_parameter: str = Field(
        "routing_key", description="request parameter hashed to pick a side; else the request id"
    )
    canary_steps: list[float] = Field(
        default_factory=lambda: [1.0, 5.0, 25.0, 50.0], description="serve_percent steps `ctl promote` walks through"
    )
    window: int = Field(1000, ge=10, le=1_000_000, description="recent shadowed requests kept for status and the guard")
    guard: GuardConfig | None = None
    circuit_breaker: CircuitBreakerConfig | None = Field(
        default_factory=CircuitBreakerConfig, description="null calls the candidate even while it keeps failing"
    )
    capture: CaptureConfig | None = Field(None, description="capture requests for replay and diagnosis")

    @field_validator("canary_steps")
    @classmethod
    def _ascending(cls, steps: list[float]) -> list[float]:
        if not steps or any(not 0 < step < 100 for step in steps) or steps != sorted(set(steps)):
            raise ValueError("must be ascending percentages strictly between 0 and 100")
        return steps

    @model_validator(mode="after")
    def _consistent(self) -> "ModelPairConfig":
        for kind, tensors in (("inputs", self.inputs), ("outputs", self.outputs)):
            names = [tensor.name for tensor in tensors]
            if len(set(names)) != len(names):
                raise ValueError(f"duplicate tensor names in {kind}: {names}")
        if self.candidate is None and (self.shadow_percent or self.serve_percent):
            raise ValueError("shadow_percent/serve_percent need a candidate backend")
        declared = {t.name for t in self.inputs} | {t.name for t in self.outputs}
        for role, backend in (("legacy", self.legacy), ("candidate", self.candidate)):
            unknown = set(backend.tensor_names) - declared if backend else set()
            if unknown:
                raise ValueError(f"{role}.tensor_names maps undeclared tensors: {sorted(unknown)}")
        return self


class ComparisonConfig(Strict):
    """When answers are compared. Every timing of the comparison path lives here, so tests can set it."""

    batch_s: float = Field(
        0.1, ge=0, description="shadow-only comparisons of small outputs wait up to this long to be compared together; "
        "answers a client got from the candidate are compared at once, whatever this says")
    batch_max: int = Field(256, ge=1, description="a batch is compared as soon as it holds this many answer pairs")
    inline_max_elements: int = Field(
        65_536, ge=1, description="outputs up to this many elements are batched; larger ones are compared one by one "
        "on the comparison thread")


class EngineConfig(Strict):
    """The shadow engine: the separate process that runs candidate calls, comparisons and rollout control."""

    nice: int = Field(10, ge=0, le=19, description="CPU niceness added to the engine, so primaries win the cores")
    idle_priority: bool = Field(
        False, description="schedule the engine SCHED_IDLE (Linux): a primary that wakes takes the core from it at "
        "once, instead of after the engine's time slice, but while the primaries keep every core busy the engine "
        "gets almost none and skips nearly all shadow work; false: only `nice` lowers it")
    memory_limit_bytes: int | None = Field(
        None, ge=256 * 1024 * 1024, description="address-space limit (RLIMIT_AS) of the engine and of in-process "
        "candidate runners; null: none")
    queue_bytes: int = Field(
        64 * 1024 * 1024, ge=1024 * 1024, description="shared-memory hand-off queue per primary worker; a hand-off "
        "that does not fit is skipped and counted as saturated, and one larger than half of it (request and answer "
        "together) never fits")
    restart_backoff_s: float = Field(0.5, gt=0, description="first pause before a dead engine is restarted; doubles "
                                     "up to 30 s while it keeps dying")
    hang_s: float = Field(10.0, gt=0, description="an engine whose heartbeat is older than this is killed and restarted")
    start_timeout_s: float = Field(120.0, gt=0, description="how long start-up waits for the engine before serving "
                                   "without it")


class ServerConfig(Strict):
    grpc_listen: ListenAddress = "0.0.0.0:8001"
    metrics_listen: ListenAddress = "0.0.0.0:8002"
    admin_listen: ListenAddress = "127.0.0.1:8003"
    admin_allow_remote: bool = Field(False, description="allow admin_listen on a non-loopback address")
    tls: ListenTLSConfig | None = Field(None, description="TLS on grpc_listen; null: plaintext")
    admin_tls: ListenTLSConfig | None = Field(None, description="TLS on admin_listen; null: plaintext")
    admin_token_file: TokenFile | None = Field(
        None, description="file holding the token every admin call must carry (`authorization: Bearer TOKEN`); "
        "read on every call, so a rotated token applies at once; null: no token asked")
    max_message_bytes: int = Field(256 * 1024 * 1024, ge=4 * 1024 * 1024)
    max_shadow_in_flight: int = Field(64, ge=1, description="candidate calls of shadowed requests running at once")
    max_shadow_waiting: int = Field(
        1024, ge=0, description="shadowed requests that wait for a free call while max_shadow_in_flight run, at most "
        "engine.queue_bytes of them; beyond either, they are skipped and counted as saturated")
    max_comparisons_queued: int = Field(256, ge=1, description="comparisons beyond this are skipped")
    shed_shadow_from_loop_busy: float | None = Field(
        0.85, gt=0, le=1,
        description="while the event loop is busier than this share of the time (averaged over the last few tenths "
        "of a second), skip a share of new shadow calls that grows to all of them 0.1 above it; null shadows even "
        "when that costs the primary throughput",
    )
    workers: int = Field(1, ge=1, le=64)
    worker_restart_backoff_s: float = Field(
        0.5, gt=0, description="first pause before a dead worker is restarted; doubles up to 30 s "
        "while it keeps dying")
    drain_s: float = Field(
        5.0, ge=0, description="after SIGTERM, health reports NOT_SERVING at once while requests are still answered "
        "for this long, so load balancers (Kubernetes endpoint removal) stop sending before the port closes")
    grace_s: float = Field(
        10.0, ge=0, description="after drain_s, new RPCs are refused and requests in flight get this long to finish "
        "before they are cancelled; Kubernetes' terminationGracePeriodSeconds must exceed drain_s + grace_s "
        "(plus any preStop sleep)")
    compare: bool = Field(
        True, description="compare legacy and candidate answers after the reply; false only shadows (no verdicts)"
    )
    metrics: bool = Field(True, description="record Prometheus metrics; false records none (to measure their cost)")
    config_poll_s: float = Field(1.0, gt=0, description="how often the config file is checked for edits")
    state_dir: Path | None = Field(
        None, description="where guard rollbacks are kept across restarts; relative to the config file; default: "
        ".shadowserve-state next to the config file where its folder is writable, else $TMPDIR/shadowserve-state")
    comparison: ComparisonConfig = ComparisonConfig()
    engine: EngineConfig = EngineConfig()
    backend_retry_s: float = Field(
        1.0, gt=0, description="first pause before a backend that failed to load is tried again; doubles up to 30 s")
    max_unjudged_served: int = Field(
        32, ge=1, description="candidate answers a primary may serve before the shadow engine has judged them; beyond "
        "this (an engine slowed, restarting or down), canary requests are answered by the legacy (fallback reason "
        "unjudged), so the wrong answers clients can get before a guard rollback do not grow with traffic")
    legacy_probe_s: float = Field(
        1.0, gt=0, description="how often each legacy backend is asked whether it can answer; a model whose legacy "
        "cannot turns not ready (ModelReady, grpc.health.v1) until it can")

    @model_validator(mode="after")
    def _admin_loopback(self) -> "ServerConfig":
        if not self.admin_allow_remote and not is_loopback(self.admin_listen):
            raise ValueError(
                f"admin_listen {self.admin_listen} is not a loopback address; "
                "set server.admin_allow_remote: true to expose the admin service"
            )
        return self


class Config(Strict):
    server: ServerConfig = ServerConfig()
    models: list[ModelPairConfig] = Field(min_length=1)

    @field_validator("models")
    @classmethod
    def _unique_names(cls, models: list[ModelPairConfig]) -> list[ModelPairConfig]:
        names = [model.name for model in models]
        duplicates = sorted({name for name in names if names.count(name) > 1})
        if duplicates:
            raise ValueError(f"duplicate model names: {duplicates}")
        return models

    @field_validator("models")
    @classmethod
    def _own_capture_dirs(cls, models: list[ModelPairConfig]) -> list[ModelPairConfig]:
        dirs = [model.capture.dir.resolve() for model in models if model.capture is not None]
        shared = sorted({str(path) for path in dirs if dirs.count(path) > 1})
        if shared:
            raise ValueError(f"models share capture dirs {shared}; give each model its own")
        return models


def _key(loc: tuple[Any, ...]) -> str:
    parts: list[str] = []
    for item in loc:
        if isinstance(item, int):
            parts.append(f"[{item}]")
        elif item in ("mxnet", "torch", "remote", "triton", "caffe") and parts:
            continue  # discriminator tag pydantic inserts; not a key the user wrote
        else:
            parts.append(("." if parts else "") + str(item))
    return "".join(parts) or "(top level)"


def parse_config(data: Any, source: str, base_dir: Path | None = None, check_files: bool = True) -> Config:
    """Validate raw config data; errors name `source` and every offending key.

    `check_files=False` skips the existence of model files, for a config meant for another machine.
    """
    try:
        return Config.model_validate(data, context={"base_dir": base_dir, "check_files": check_files})
    except ValidationError as exc:
        problems = [f"  {_key(err['loc'])}: {err['msg']}" for err in exc.errors()]
        raise ConfigError(f"{source}: invalid configuration\n" + "\n".join(problems)) from None


def load_config(path: str | Path, check_files: bool = True) -> Config:
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read config: {exc.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping with 'server' and 'models' keys")
    return parse_config(data, str(path), base_dir=path.parent, check_files=check_files)
