"""The admin gRPC service (protos/admin.proto): rollout status and control for operators and `ctl`."""

from __future__ import annotations

import dataclasses
import hmac
import logging
from pathlib import Path

import grpc

from protos import admin_pb2 as pb
from protos import admin_pb2_grpc
from server.config import ServerConfig, is_loopback
from server.desired_state import Persistence
from server.dispatch import ModelPair
from server.errors import ConfigError, InvalidRequest
from server.grpc_front import StatusInterceptor
from server.rollout import RolloutController
from server.transport import add_port

log = logging.getLogger("shadowserve.admin")


def pair_status(pair: ModelPair, last_rollback_reason: str = "", persistence: Persistence | None = None) -> pb.PairStatus:
    summary = pair.window.summary()
    window = pb.WindowStats(samples=summary.samples, compared=summary.compared)
    for field, value in (
        ("match_rate", summary.match_rate),
        ("top1_agreement", summary.top1_agreement),
        ("error_rate", summary.error_rate),
        ("legacy_p50_seconds", summary.latency_p50["legacy"]),
        ("legacy_p99_seconds", summary.latency_p99["legacy"]),
        ("candidate_p50_seconds", summary.latency_p50["candidate"]),
        ("candidate_p99_seconds", summary.latency_p99["candidate"]),
        ("max_abs_p50", summary.max_abs_p50),
        ("max_abs_p99", summary.max_abs_p99),
    ):
        if value is not None:
            setattr(window, field, value)
    return pb.PairStatus(
        model=pair.name, stage=pair.stage, shadow_percent=pair.shadow_percent, serve_percent=pair.serve_percent,
        has_candidate=pair.candidate is not None, window=window, last_rollback_reason=last_rollback_reason,
        candidate_circuit_open=pair.breaker.is_open,
        persistence=None if persistence is None else pb.Persistence(**dataclasses.asdict(persistence)),
    )


class AdminServicer(admin_pb2_grpc.ShadowAdminServicer):
    def __init__(self, controller: RolloutController) -> None:
        self.controller = controller

    def _status(self, pair: ModelPair) -> pb.PairStatus:
        state = self.controller.desired_state
        persistence = None if state is None else state.describe(
            pair.name, pair.shadow_percent, pair.serve_percent, pair.stage == "rolled_back")
        return pair_status(pair, self.controller.last_rollback_reason.get(pair.name, ""), persistence)

    def _changed(self, pair: ModelPair) -> pb.PairStatus:
        """A change's reply: the pair now, and whether the change was written into the config file."""
        return pair_status(pair, self.controller.last_rollback_reason.get(pair.name, ""),
                           self.controller.persistence.get(pair.name))

    async def Status(self, request, context):
        pairs = [self.controller.pair(request.model)] if request.model else list(self.controller.dispatcher.pairs.values())
        state = self.controller.desired_state
        response = pb.StatusResponse(pairs=[self._status(pair) for pair in pairs],
                                     config_digest=state.digest[:12] if state is not None and state.digest else "")
        if request.include_history:
            response.history.extend(
                pb.Change(**dataclasses.asdict(change))
                for change in self.controller.history
                if not request.model or change.model == request.model
            )
        return response

    async def SetPercentages(self, request, context):
        if not request.HasField("shadow_percent") and not request.HasField("serve_percent"):
            raise InvalidRequest("give shadow_percent, serve_percent or both")
        pair = self.controller.set_percentages(
            request.model,
            request.shadow_percent if request.HasField("shadow_percent") else None,
            request.serve_percent if request.HasField("serve_percent") else None,
            request.source or "api",
            request.reason,
        )
        return self._changed(pair)

    async def Promote(self, request, context):
        return self._changed(self.controller.promote(request.model, request.source or "api", request.reason))

    async def Rollback(self, request, context):
        return self._changed(self.controller.rollback(request.model, request.source or "api", request.reason or "manual"))


class TokenInterceptor(grpc.aio.ServerInterceptor):
    """Every call must carry `authorization: Bearer TOKEN`; the file is read per call, so a new token applies at once."""

    def __init__(self, token_file: Path) -> None:
        self.token_file = token_file

    def _expected(self) -> bytes | None:
        try:
            return self.token_file.read_bytes().strip()
        except OSError as exc:
            log.error("cannot read server.admin_token_file %s: %s; refusing admin calls", self.token_file, exc.strerror)
            return None

    async def intercept_service(self, continuation, details):
        sent = dict(details.invocation_metadata or ()).get("authorization", "")
        expected = self._expected()
        if expected and hmac.compare_digest(sent.encode(), b"Bearer " + expected):
            return await continuation(details)
        return grpc.unary_unary_rpc_method_handler(_unauthenticated)


async def _unauthenticated(request, context) -> None:
    context.set_code(grpc.StatusCode.UNAUTHENTICATED)  # a status, not abort(): as the front, no exception cycle
    context.set_details("missing or wrong admin token (authorization: Bearer TOKEN)")


async def start_admin_server(controller: RolloutController, settings: ServerConfig) -> tuple[grpc.aio.Server, int]:
    listen = settings.admin_listen
    if not settings.admin_allow_remote and not is_loopback(listen):
        raise ConfigError(f"server.admin_listen {listen} is not loopback; set server.admin_allow_remote to expose it")
    interceptors: list[grpc.aio.ServerInterceptor] = [StatusInterceptor()]
    if settings.admin_token_file is not None:
        interceptors.insert(0, TokenInterceptor(settings.admin_token_file))
    server = grpc.aio.server(interceptors=interceptors)
    admin_pb2_grpc.add_ShadowAdminServicer_to_server(AdminServicer(controller), server)
    port = add_port(server, listen, settings.admin_tls)
    await server.start()
    return server, port
