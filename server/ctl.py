"""`shadowserve ctl`: the operator's rollout commands, over the admin gRPC service."""

from __future__ import annotations

import argparse
import datetime
import json
import os
from pathlib import Path

import grpc
from google.protobuf import json_format
from pydantic import ValidationError

from protos import admin_pb2 as pb
from protos import admin_pb2_grpc
from server.config import ChannelTLSConfig
from server.errors import ConfigError
from server.transport import channel_credentials


def _rate(message, field: str) -> str:
    return f"{getattr(message, field) * 100:.1f}%" if message.HasField(field) else "-"


def _ms(message, field: str) -> str:
    return f"{getattr(message, field) * 1000:.1f}" if message.HasField(field) else "-"


def format_persistence(pair, change: bool) -> list[str]:
    """What an operator must know about a pair's state outlasting a restart; `change`: for a change's reply."""
    if not pair.HasField("persistence"):
        return []
    kept = pair.persistence
    if kept.persisted:
        if change:
            return [f"{pair.model}: saved in {kept.path}"]
        return [f"{pair.model}: {kept.note} ({kept.path})"] if kept.note else []
    what = "this change" if change else "the state in force"
    lines = [f"{pair.model}: not persisted ({kept.note}): {what} lasts only until the gateway restarts"]
    if kept.hint:
        lines += ["to make it last, patch the ConfigMap the config file is mounted from "
                  "(every replica follows within the kubelet's sync delay, typically up to a minute):",
                  f"  {kept.hint}"]
    return lines


def format_status(pairs, history=(), change: bool = False) -> str:
    rows = [("model", "stage", "shadow%", "serve%", "samples", "match", "top-1", "cand err", "legacy p99 ms", "cand p99 ms")]
    for pair in pairs:
        w = pair.window
        rows.append((pair.model, pair.stage, f"{pair.shadow_percent:g}", f"{pair.serve_percent:g}", str(w.samples),
                     _rate(w, "match_rate"), _rate(w, "top1_agreement"), _rate(w, "error_rate"),
                     _ms(w, "legacy_p99_seconds"), _ms(w, "candidate_p99_seconds")))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows]
    lines += [f"{pair.model}: last rollback: {pair.last_rollback_reason}" for pair in pairs if pair.last_rollback_reason]
    lines += [f"{pair.model}: candidate circuit open: calls paused after failures in a row, probed again later"
              for pair in pairs if pair.candidate_circuit_open]
    lines += [line for pair in pairs for line in format_persistence(pair, change)]
    if history:
        lines.append("")
        lines.append("history:")
        for entry in history:
            when = datetime.datetime.fromtimestamp(entry.time_unix).isoformat(timespec="seconds")
            lines.append(
                f"  {when} {entry.model} [{entry.source}] {entry.old_stage} -> {entry.new_stage} "
                f"shadow {entry.old_shadow_percent:g} -> {entry.new_shadow_percent:g}, "
                f"serve {entry.old_serve_percent:g} -> {entry.new_serve_percent:g}"
                + (f" ({entry.reason})" if entry.reason else "")
            )
    return "\n".join(lines)


def as_json(message) -> dict:
    data = json_format.MessageToDict(message, always_print_fields_with_no_presence=True, preserving_proto_field_name=True)
    for pair in data.get("pairs", []):
        pair["window"]["samples"] = int(pair["window"]["samples"])  # a number, not the JSON mapping's 64-bit string
    return data


def print_json(data: dict) -> None:
    print(json.dumps(data, indent=2))


def open_channel(args: argparse.Namespace) -> grpc.Channel:
    """TLS when any of --ca-file, --cert-file, --key-file is given; plaintext otherwise."""
    files = {"ca_file": args.ca_file, "cert_file": args.cert_file, "key_file": args.key_file}
    if not any(files.values()):
        return grpc.insecure_channel(args.admin)
    try:
        tls = ChannelTLSConfig(**files)
    except ValidationError as exc:
        raise ConfigError("ctl TLS options: " + "; ".join(error["msg"] for error in exc.errors())) from None
    return grpc.secure_channel(args.admin, channel_credentials(tls))


def call_metadata(args: argparse.Namespace) -> list[tuple[str, str]]:
    """The admin token from --token-file, else from env SHADOWSERVE_ADMIN_TOKEN; none when neither is set."""
    try:
        token = Path(args.token_file).read_text() if args.token_file else os.environ.get("SHADOWSERVE_ADMIN_TOKEN", "")
    except OSError as exc:
        raise ConfigError(f"--token-file {args.token_file}: {exc.strerror}") from None
    return [("authorization", f"Bearer {token.strip()}")] if token.strip() else []


def run(args: argparse.Namespace) -> int:
    output = args.output
    call = {"timeout": args.timeout, "metadata": call_metadata(args)}
    with open_channel(args) as channel:
        admin = admin_pb2_grpc.ShadowAdminStub(channel)
        try:
            if args.action == "status":
                reply = admin.Status(pb.StatusRequest(model=args.model or "", include_history=args.history), **call)
                if output == "json":
                    print_json(as_json(reply))
                else:
                    print(format_status(reply.pairs, reply.history))
                return 0
            if args.action == "set":
                request = pb.SetPercentagesRequest(model=args.model, source="cli", reason=args.reason)
                if args.shadow is not None:
                    request.shadow_percent = args.shadow
                if args.serve is not None:
                    request.serve_percent = args.serve
                pair = admin.SetPercentages(request, **call)
            elif args.action == "promote":
                pair = admin.Promote(pb.PromoteRequest(model=args.model, source="cli", reason=args.reason), **call)
            else:
                request = pb.RollbackRequest(model=args.model, source="cli", reason=args.reason or "manual")
                pair = admin.Rollback(request, **call)
        except grpc.RpcError as error:
            if output == "json":
                print_json({"error": {"code": error.code().name, "message": error.details()}})
            else:
                print(f"shadowserve ctl: {error.code().name}: {error.details()}")
            return 1
    if output == "json":
        print_json({"pairs": as_json(pb.StatusResponse(pairs=[pair]))["pairs"]})
    else:
        print(format_status([pair], change=True))
    return 0


def add_parser(commands) -> None:
    ctl = commands.add_parser("ctl", help="rollout status and control of a running gateway")
    ctl.add_argument("--admin", default=os.environ.get("SHADOWSERVE_ADMIN", "127.0.0.1:8003"), help="admin address HOST:PORT (env SHADOWSERVE_ADMIN)")
    ctl.add_argument("--timeout", type=float, default=5.0, help="seconds to wait for the gateway")
    ctl.add_argument("--token-file", help="file holding the admin token (default: env SHADOWSERVE_ADMIN_TOKEN)")
    ctl.add_argument("--ca-file", help="PEM CA bundle that signed the admin's certificate; any of the TLS options "
                     "turns TLS on")
    ctl.add_argument("--cert-file", help="PEM client certificate, for an admin that requires one (mTLS)")
    ctl.add_argument("--key-file", help="PEM private key of --cert-file")
    output_help = "text (default), or json: the reply as JSON, for scripts"
    ctl.add_argument("-o", "--output", choices=["text", "json"], default="text", help=output_help)
    output = argparse.ArgumentParser(add_help=False)  # -o also after the action: `ctl status -o json`
    output.add_argument("-o", "--output", choices=["text", "json"], default=argparse.SUPPRESS, help=output_help)
    actions = ctl.add_subparsers(dest="action", required=True)
    status = actions.add_parser("status", parents=[output], help="stage, percentages and recent health per model")
    status.add_argument("model", nargs="?", help="one model (default: all)")
    status.add_argument("--history", action="store_true", help="also show the change history")
    set_ = actions.add_parser("set", parents=[output], help="set shadow and/or serve percentages")
    set_.add_argument("model")
    set_.add_argument("--shadow", type=float, help="share of requests also sent to the candidate (0-100)")
    set_.add_argument("--serve", type=float, help="share of requests answered by the candidate (0-100)")
    set_.add_argument("--reason", default="")
    promote = actions.add_parser("promote", parents=[output], help="move to the next stage: shadow, canary steps, cutover")
    promote.add_argument("model")
    promote.add_argument("--reason", default="")
    rollback = actions.add_parser("rollback", parents=[output], help="stop serving from the candidate now (shadowing continues)")
    rollback.add_argument("model")
    rollback.add_argument("--reason", default="")
    ctl.set_defaults(run=run)
