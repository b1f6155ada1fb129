"""`shadowserve capture ls` and `capture show`: what was captured, and where one record's answers differ."""

from __future__ import annotations

import datetime
from typing import Sequence

import numpy as np

from server.capture import CapturedRecord, RecordTensors
from server.insight.text import sci, table


def _when(unix: float | None) -> str:
    return datetime.datetime.fromtimestamp(unix).isoformat(timespec="milliseconds") if unix is not None else "-"


def _worst(record: CapturedRecord, measure: str) -> float | None:
    values = [out.get(measure) for out in record.outputs.values() if out.get(measure) is not None]
    return max(values) if values else None


def list_rows(records: Sequence[CapturedRecord]) -> list[dict]:
    return [{"id": r.id, "time": r.meta.get("time_unix"), "model": r.model, "stage": r.meta.get("stage"),
             "verdict": r.verdict, "request_id": r.meta.get("request_id"), "routing_key": r.meta.get("routing_key"),
             "max_abs": _worst(r, "max_abs"), "rel_l2": _worst(r, "rel_l2")} for r in records]


def format_list(rows: Sequence[dict]) -> str:
    header = ("id", "time", "model", "stage", "verdict", "request id", "routing key", "max|d|", "rel_l2")
    return table(header, [(row["id"], _when(row["time"]), row["model"], row["stage"] or "-", row["verdict"],
                           row["request_id"] or "-", row["routing_key"] or "-", sci(row["max_abs"]), sci(row["rel_l2"]))
                          for row in rows])


def _index(flat: int, shape: tuple[int, ...]) -> list[int]:
    return [int(i) for i in np.unravel_index(flat, shape)]


def largest_differences(legacy: np.ndarray, candidate: np.ndarray, count: int) -> list[dict]:
    """The `count` elements where the answers differ most (NaN and inf first), with their positions."""
    diff = np.abs(candidate.astype(np.float64) - legacy.astype(np.float64)).ravel()
    diff = np.where(np.isnan(diff), np.inf, diff)
    order = np.argsort(-diff, kind="stable")[:count]
    return [{"index": _index(i, legacy.shape), "legacy": float(legacy.ravel()[i]),
             "candidate": float(candidate.ravel()[i]), "abs_diff": float(diff[i])} for i in order if diff[i] > 0]


def top_k(scores: np.ndarray, k: int, rows: int) -> list[list[tuple[int, float]]]:
    """(class, score) of the k highest scores of the first `rows` rows, highest first."""
    flat = scores.reshape(-1, scores.shape[-1])[:rows].astype(np.float64)
    order = np.argsort(-flat, axis=1, kind="stable")[:, :k]
    return [[(int(c), float(row[c])) for c in classes] for row, classes in zip(flat, order)]


def describe(record: CapturedRecord, tensors: RecordTensors, k: int = 5, largest: int = 5, rows: int = 4) -> dict:
    """Everything `capture show` prints about one record, as JSON-ready data."""
    outputs = {}
    for name in sorted(set(tensors.legacy) | set(tensors.candidate)):
        ref, new = tensors.legacy.get(name), tensors.candidate.get(name)
        entry: dict = {"legacy": None if ref is None else f"{ref.dtype}{list(ref.shape)}",
                       "candidate": None if new is None else f"{new.dtype}{list(new.shape)}",
                       "measures": record.outputs.get(name)}
        if ref is not None and new is not None and ref.shape == new.shape and ref.dtype.kind in "fiu":
            entry["largest_differences"] = largest_differences(ref, new, largest)
            if (record.outputs.get(name) or {}).get("class_scores"):
                entry["top_k"] = {"legacy": top_k(ref, k, rows), "candidate": top_k(new, k, rows)}
        outputs[name] = entry
    meta = {key: value for key, value in record.meta.items() if key != "outputs"}
    inputs = {name: f"{array.dtype}{list(array.shape)}" for name, array in tensors.inputs.items()}
    return {**meta, "inputs": inputs, "outputs": outputs}


def format_record(described: dict) -> str:
    d = described
    lines = [f"record {d['id']}  model {d['model']}  stage {d.get('stage') or '-'}  verdict {d['verdict']}",
             f"request id {d.get('request_id') or '-'}  routing key {d.get('routing_key') or '-'}  "
             f"received {_when(d.get('time_unix'))}  captured {_when(d.get('captured_unix'))}"]
    if d.get("detail"):
        lines.append(f"detail: {d['detail']}")
    lines.append("inputs: " + ", ".join(f"{name} {spec}" for name, spec in d["inputs"].items()))
    for name, out in d["outputs"].items():
        lines += ["", f"output {name}: legacy {out['legacy'] or 'missing'}, candidate {out['candidate'] or 'missing'}"]
        measures = out.get("measures") or {}
        if measures:
            lines.append("  " + "  ".join(f"{key} {sci(measures.get(key))}" for key in ("max_abs", "mean_abs", "rel_l2", "cosine"))
                         + f"  within tolerance: {'yes' if measures.get('within_tolerance') else 'no'}")
        if out.get("largest_differences"):
            lines.append("  largest differences:")
            lines += ["    " + line for line in table(
                ("index", "legacy", "candidate", "|d|"),
                [(str(e["index"]), f"{e['legacy']:.6g}", f"{e['candidate']:.6g}", sci(e["abs_diff"]))
                 for e in out["largest_differences"]]).splitlines()]
        if out.get("top_k"):
            lines.append("  top-k (class: score), per row:")
            for row, (ref, new) in enumerate(zip(out["top_k"]["legacy"], out["top_k"]["candidate"])):
                show = lambda pairs: ", ".join(f"{c}: {s:.4g}" for c, s in pairs)  # noqa: E731
                lines.append(f"    row {row}: legacy    {show(ref)}")
                lines.append(f"    row {row}: candidate {show(new)}")
    return "\n".join(lines)
