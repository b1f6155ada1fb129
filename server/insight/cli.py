"""`shadowserve capture ls|show`, `replay`, `diagnose`, `suggest-tolerances`: offline tools over a capture folder."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import functools
import json
import math
import sys
from pathlib import Path
from typing import Callable

from server.insight import InsightError
from server.insight.text import ms, percent, sci, table

GATE_FAILED = 1
UNUSABLE = 2  # the command could not run as asked (same as a config error)


def _reported(command: str) -> Callable:
    """Errors a user can act on go to stderr as one line, with exit status 2."""
    def wrap(run: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
        @functools.wraps(run)
        def checked(args: argparse.Namespace) -> int:
            from server.capture import CaptureError
            from server.errors import ShadowServeError

            try:
                return run(args)
            except (InsightError, CaptureError, ShadowServeError) as exc:
                print(f"shadowserve {command}: {exc}", file=sys.stderr)
                return UNUSABLE
        return checked
    return wrap


def _print_json(data) -> None:
    print(json.dumps(data, indent=2, default=str))


def _describe_backend(backend) -> str:
    for field in ("path", "caffemodel", "symbol"):
        if hasattr(backend, field):
            return f"{backend.runtime} {Path(getattr(backend, field)).name}"
    return f"{backend.runtime} {backend.url}/{backend.model}"


def _pair_and_records(args: argparse.Namespace):
    from server.config import load_config
    from server.insight.sources import pair_records, select_pair

    pair = select_pair(load_config(args.config), args.model)
    return pair, pair_records(args.dir, pair)


@_reported("capture")
def _capture(args: argparse.Namespace) -> int:
    from server.capture import find_record, read_records
    from server.insight.show import describe, format_list, format_record, list_rows

    if args.action == "ls":
        rows = list_rows(read_records(args.dir))
        if args.json:
            _print_json(rows)
        else:
            print(format_list(rows) if rows else f"{args.dir}: no records")
        return 0
    record = find_record(args.dir, args.id)
    described = describe(record, record.load(), k=args.top_k, largest=args.largest)
    if args.json:
        _print_json(described)
    else:
        print(format_record(described))
    return 0


@_reported("replay")
def _replay(args: argparse.Namespace) -> int:
    from server.insight.replay import Thresholds, breaches, flip_counts, replay, summarize

    pair, records = _pair_and_records(args)
    atol = pair.atol if args.atol is None else args.atol
    rtol = pair.rtol if args.rtol is None else args.rtol
    given = Thresholds(args.max_mismatch_rate, args.min_top1_agreement, args.max_error_rate, args.max_p99_latency_s)
    thresholds, source = (given, "command line") if given.given() else (Thresholds.of_guard(pair.guard), "the pair's guard")
    outcomes = asyncio.run(replay(pair, records, atol, rtol))
    summary, flips = summarize(outcomes), flip_counts(outcomes)
    found = breaches(summary, thresholds) if thresholds.given() else []
    if args.json:
        _print_json({"model": pair.name, "candidate": _describe_backend(pair.candidate), "atol": atol, "rtol": rtol,
                     "summary": dataclasses.asdict(summary),
                     "flips": {o: [{"legacy": a, "candidate": b, "rows": n} for a, b, n in f] for o, f in flips.items()},
                     "thresholds": {**dataclasses.asdict(thresholds), "source": source if thresholds.given() else None},
                     "breaches": found, "passed": not found,
                     "records": [{"id": o.id, "verdict": o.verdict, "detail": o.detail} for o in outcomes]})
    else:
        print(_replay_text(pair, summary, flips, atol, rtol, thresholds, source, found))
    return GATE_FAILED if found else 0


def _replay_text(pair, summary, flips, atol, rtol, thresholds, source, found) -> str:
    header = ("model", "candidate", "compared", "skipped", "match", "top-1 agree", "max|d| p50", "max|d| p99",
              "legacy p50/p99 ms", "candidate p50/p99 ms")
    row = (pair.name, _describe_backend(pair.candidate), str(summary.compared), str(summary.skipped),
           percent(summary.match_rate), percent(summary.top1_agreement), sci(summary.max_abs_p50),
           sci(summary.max_abs_p99), f"{ms(summary.latency_p50['legacy'])} / {ms(summary.latency_p99['legacy'])}",
           f"{ms(summary.latency_p50['candidate'])} / {ms(summary.latency_p99['candidate'])}")
    lines = [f"replayed {summary.records} captured records (atol {atol:g}, rtol {rtol:g})", "", table(header, [row])]
    if summary.errors:
        lines.append(f"candidate failed on {summary.errors} records")
    if summary.legacy_drift:
        lines.append(f"note: the legacy now answers {summary.legacy_drift} records differently from when they were "
                     "captured; is the config's legacy the one in production?")
    for output, counts in flips.items():
        total = sum(n for _, _, n in counts)
        lines += ["", f"class flips of {output!r} (legacy top-1 -> candidate top-1), most frequent first:",
                  table(("legacy top-1", "candidate top-1", "rows", "share of flips"),
                        [(str(a), str(b), str(n), percent(n / total)) for a, b, n in counts])]
    lines.append("")
    if not thresholds.given():
        lines.append("gate: no thresholds (give --max-mismatch-rate etc., or a guard in the config): not judged")
    else:
        limits = ", ".join(f"{k} {v:g}" for k, v in dataclasses.asdict(thresholds).items() if v is not None)
        lines.append(f"gate ({source}: {limits}): " + ("FAILED: " + "; ".join(found) if found else "passed"))
    return "\n".join(lines)


@_reported("diagnose")
def _diagnose(args: argparse.Namespace) -> int:
    from server.insight.diagnose import run_diagnosis

    pair, records = _pair_and_records(args)
    diagnosis = asyncio.run(run_diagnosis(pair, records))
    if args.json:
        _print_json({**dataclasses.asdict(diagnosis), "candidate": _describe_backend(pair.candidate)})
        return 0
    d, before = diagnosis, diagnosis.baseline
    lines = [f"diagnosis of model {d.model}: {d.records} captured records ({d.captured_mismatches} captured as "
             f"mismatches), candidate {_describe_backend(pair.candidate)}, legacy answers as captured",
             f"as the candidate answers now: mismatch rate {percent(before.mismatch_rate)}, top-1 agreement "
             f"{percent(before.top1_agreement)}, median rel_l2 {sci(before.rel_l2_median)}"]
    if d.trials:
        rows = [(t.name, t.kind, percent(t.after.mismatch_rate), percent(t.after.top1_agreement), sci(t.after.rel_l2_median))
                if t.after else (t.name, t.kind, "n/a", "-", "-") for t in d.trials]
        lines += ["", "fixes tried one at a time (input: on the candidate's input; output: on the answers):",
                  table(("transform applied", "kind", "mismatch rate", "top-1 agree", "median rel_l2"), rows)]
        lines += [f"n/a: {t.name}: {t.error}" for t in d.trials if t.after is None]
    lines += ["", d.conclusion]
    lines += [f"- {finding}" for finding in d.findings]
    print("\n".join(lines))
    return 0


@_reported("suggest-tolerances")
def _suggest(args: argparse.Namespace) -> int:
    from server.capture import read_records
    from server.compare import MATCH
    from server.insight.tolerances import suggest

    if not 0 < args.false_alarm_rate < 1:
        raise InsightError(f"--false-alarm-rate must be between 0 and 1, got {args.false_alarm_rate:g}")
    records = [r for r in read_records(args.dir) if args.samples == "all" or r.verdict == MATCH]
    if not records:
        raise InsightError(f"{args.dir}: no matching control records; raise capture.matches_percent, or pass "
                           "--samples all when every captured answer of this candidate is acceptable")
    sides: dict[str, tuple[list, list]] = {}
    for record in records:
        tensors = record.load()
        for name, array in tensors.legacy.items():
            if name in tensors.candidate:
                sides.setdefault(name, ([], []))
                sides[name][0].append(array)
                sides[name][1].append(tensors.candidate[name])
    suggestions = [suggest(name, legacy, candidate, args.false_alarm_rate)
                   for name, (legacy, candidate) in sorted(sides.items())]
    atol, rtol = max(s.atol for s in suggestions), max(s.rtol for s in suggestions)
    if args.json:
        _print_json({"false_alarm_rate": args.false_alarm_rate, "samples": args.samples,
                     "outputs": [dataclasses.asdict(s) for s in suggestions], "pair": {"atol": atol, "rtol": rtol}})
        return 0
    print(f"from {len(records)} control records ({args.samples}), target false-alarm rate "
          f"{percent(args.false_alarm_rate)}:")
    print(table(("output", "samples", "atol", "rtol", "false alarms on the samples"),
                [(s.output, str(s.samples), f"{s.atol:.3g}", f"{s.rtol:.3g}", percent(s.false_alarm_rate))
                 for s in suggestions]))
    for s in suggestions:
        if not s.resolvable:
            print(f"note: {s.samples} samples of {s.output!r} cannot resolve a {percent(args.false_alarm_rate)} rate "
                  f"(needs {math.ceil(1 / args.false_alarm_rate)}): its values are the largest seen; capture more controls")
    print(f"\nfor the pair (one atol/rtol covers every output):\n  atol: {atol:.3g}\n  rtol: {rtol:.3g}")
    return 0


def add_parser(commands) -> None:
    """Register the capture, replay, diagnose and suggest-tolerances commands."""
    capture = commands.add_parser("capture", help="list and show captured requests")
    actions = capture.add_subparsers(dest="action", required=True)
    ls = actions.add_parser("ls", help="the records of a capture folder, oldest first")
    ls.add_argument("dir", help="capture folder (capture.dir in the config)")
    ls.add_argument("--json", action="store_true", help="machine-readable output")
    show = actions.add_parser("show", help="one record: largest differences, top-k of both sides, measures")
    show.add_argument("dir", help="capture folder")
    show.add_argument("id", help="record id (or a unique prefix of it)")
    show.add_argument("--top-k", type=int, default=5, help="classes shown per row of class-score outputs")
    show.add_argument("--largest", type=int, default=5, help="largest element differences shown per output")
    show.add_argument("--json", action="store_true", help="machine-readable output")
    capture.set_defaults(run=_capture)

    def pair_command(name: str, help_text: str, run: Callable):
        command = commands.add_parser(name, help=help_text)
        command.add_argument("dir", help="capture folder")
        command.add_argument("--config", required=True, help="YAML config naming the legacy and the candidate")
        command.add_argument("--model", help="model pair of the config (default: its only one)")
        command.add_argument("--json", action="store_true", help="machine-readable output")
        command.set_defaults(run=run)
        return command

    replay = pair_command("replay", "run captured inputs through the config's legacy and candidate; a CI gate", _replay)
    replay.add_argument("--max-mismatch-rate", type=float, help="fail above this share of mismatching records")
    replay.add_argument("--min-top1-agreement", type=float, help="fail below this share of agreeing top-1 rows")
    replay.add_argument("--max-error-rate", type=float, help="fail above this share of candidate failures")
    replay.add_argument("--max-p99-latency-s", type=float, help="fail above this candidate p99 latency (seconds)")
    replay.add_argument("--atol", type=float, help="absolute tolerance of a match (default: the pair's)")
    replay.add_argument("--rtol", type=float, help="relative tolerance of a match (default: the pair's)")
    pair_command("diagnose", "try the classic migration bugs on captured mismatches and name the likely one", _diagnose)

    suggest = commands.add_parser("suggest-tolerances", help="atol/rtol per output from captured control samples")
    suggest.add_argument("dir", help="capture folder")
    suggest.add_argument("--false-alarm-rate", type=float, default=0.01,
                         help="share of control records allowed to mismatch (default 0.01)")
    suggest.add_argument("--samples", choices=["matches", "all"], default="matches",
                         help="records to learn from: the matching controls, or every record")
    suggest.add_argument("--json", action="store_true", help="machine-readable output")
    suggest.set_defaults(run=_suggest)
