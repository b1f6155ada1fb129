"""The config file as the gateway's desired rollout state, and guard rollbacks kept across restarts.

`ctl set | promote | rollback` write the percentages they set into the config file, so every
replica reading it follows and a restarted gateway starts where it left off. Only the numbers
change: the edit replaces their text in place (located by the YAML parser) and keeps every other
byte, comments and layout included. A read-only file (a ConfigMap mount) is left alone; the
change then lasts until a restart, and `kubectl_patch` says what would make it last.

A guard rollback is also recorded in a state folder, because a file cannot say *why* a candidate
serves nothing: on start the rollback is restored while the file's percentages of that model are
still the ones it was rolled back from; any change an operator makes drops the record.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import fcntl
import hashlib
import json
import logging
import os
import shlex
import stat
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator

import yaml

from server.config import Config, parse_config
from server.errors import ConfigError
from server.metrics import Metrics

log = logging.getLogger("shadowserve.desired_state")

PERCENT_KEYS = ("shadow_percent", "serve_percent")
STATE_DIR_NAME = ".shadowserve-state"
CONFIGMAP_ENV = "SHADOWSERVE_CONFIGMAP"
NAMESPACE_ENV = "POD_NAMESPACE"


@dataclasses.dataclass(frozen=True)
class Persistence:
    """Whether the state in force outlasts a restart, where it is kept, and what would make it last."""

    persisted: bool
    path: str
    note: str = ""
    hint: str = ""


class EditError(Exception):
    """The percentages cannot be written into the file's text without changing anything else."""


def file_digest(path: Path) -> str | None:
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError:
        return None  # mid-swap or briefly missing: look again next time


def format_percent(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(float(value))


def _key_node(mapping: yaml.MappingNode, key: str) -> tuple[yaml.Node, yaml.Node] | None:
    for key_node, value_node in mapping.value:
        if isinstance(key_node, yaml.ScalarNode) and key_node.value == key:
            return key_node, value_node
    return None


def edit_percentages(text: str, model: str, percentages: dict[str, float]) -> str:
    """`text` with `model`'s percentages set; every other byte unchanged. Raises EditError."""
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
        before = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise EditError(f"not valid YAML: {exc}") from None
    models = _key_node(root, "models") if isinstance(root, yaml.MappingNode) else None
    if models is None or not isinstance(models[1], yaml.SequenceNode):
        raise EditError("no 'models' list")
    entry = next((node for node in models[1].value if isinstance(node, yaml.MappingNode)
                  and (name := _key_node(node, "name")) is not None and name[1].value == model), None)
    if entry is None:
        raise EditError(f"no model named {model!r}")
    edits: list[tuple[int, int, str]] = []
    missing = []
    for key, value in percentages.items():
        found = _key_node(entry, key)
        if found is None:
            if value:
                missing.append(f"{key}: {format_percent(value)}")
        elif isinstance(found[1], yaml.ScalarNode):
            edits.append(_replace_keeping_comment_column(text, found[1], format_percent(value)))
        else:
            raise EditError(f"{key} of {model!r} is not a number")
    if missing:
        if entry.flow_style:  # {name: m, ...}: add before the closing brace
            edits.append((entry.end_mark.index - 1, entry.end_mark.index - 1, ", " + ", ".join(missing)))
        else:  # a line of its own under `name`, at the same indentation
            name_key, name_value = _key_node(entry, "name")  # type: ignore[misc]
            line_end = text.find("\n", name_value.end_mark.index)
            at = len(text) if line_end < 0 else line_end + 1
            indent = " " * name_key.start_mark.column
            edits.append((at, at, ("" if line_end >= 0 else "\n") + "".join(f"{indent}{line}\n" for line in missing)))
    for start, end, replacement in sorted(edits, reverse=True):
        text = text[:start] + replacement + text[end:]
    expected = copy.deepcopy(before)
    for item in expected["models"]:
        if isinstance(item, dict) and item.get("name") == model:
            item.update({key: value for key, value in percentages.items() if value or key in item})
    try:
        unchanged_elsewhere = yaml.safe_load(text) == expected
    except yaml.YAMLError:
        unchanged_elsewhere = False
    if not unchanged_elsewhere:  # a value behind an anchor others use, say: refuse rather than change them
        raise EditError(f"the percentages of {model!r} cannot be changed without changing other values")
    return text


def _replace_keeping_comment_column(text: str, node: yaml.Node, replacement: str) -> tuple[int, int, str]:
    """An edit replacing `node`'s text; a comment after it stays in its column where the spaces allow."""
    start, end = node.start_mark.index, node.end_mark.index
    spaces = len(text[end:]) - len(text[end:].lstrip(" "))
    if text[end + spaces:end + spaces + 1] == "#":
        pad = max(1, spaces + (end - start) - len(replacement))
        return start, end + spaces, replacement + " " * pad
    return start, end, replacement


@contextlib.contextmanager
def _locked(directory: Path) -> Iterator[None]:
    """Serialise read-modify-write cycles of processes sharing `directory` (replicas on one host)."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def write_atomically(path: Path, text: str) -> None:
    """Replace `path` (a symlink's target) by `text`: a reader sees the old file or the new one, never a mix."""
    target = path.resolve()
    mode = stat.S_IMODE(target.stat().st_mode) if target.exists() else 0o644
    fd, temp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as file:
            file.write(text.encode("utf-8"))
            file.flush()
            os.fsync(file.fileno())
        os.chmod(temp, mode)
        os.replace(temp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temp)
        raise
    directory = os.open(target.parent, os.O_RDONLY)
    try:
        os.fsync(directory)  # the rename itself survives a crash
    finally:
        os.close(directory)


def _no_write_bits(path: Path) -> bool:
    """Mode bits that let nobody write: respected even when running as root, which could."""
    return not stat.S_IMODE(path.stat().st_mode) & 0o222


def _writable_folder(folder: Path) -> bool:
    return not (folder / "..data").exists() and not _no_write_bits(folder) and os.access(folder, os.W_OK)


def read_only_reason(path: Path) -> str | None:
    """Why `path` must not be rewritten (a ConfigMap mount, a read-only file or folder), or None."""
    if (path.parent / "..data").exists():
        return "a ConfigMap or Secret mount"
    try:
        target = path.resolve()
        if _no_write_bits(target):
            return "a read-only file"
        if not _writable_folder(target.parent):
            return "in a read-only folder"
    except OSError as exc:
        return exc.strerror
    return None


def default_state_dir(config_path: Path) -> Path:
    """Next to the config file where its folder is writable, else $TMPDIR/shadowserve-state."""
    if _writable_folder(config_path.parent):
        return config_path.parent / STATE_DIR_NAME
    return Path(tempfile.gettempdir()) / "shadowserve-state"


class DesiredState:
    """The config file this gateway follows, written back on changes, plus its record of guard rollbacks.

    `digest` and `config` are the file content the gateway last applied; the config
    watcher compares the file against them, and a write made here moves them on, so the watcher
    does not apply the gateway's own change a second time.
    """

    def __init__(self, config_path: Path, config: Config, metrics: Metrics | None = None,
                 state_dir: Path | None = None, configmap: str | None = None) -> None:
        self.path = Path(config_path)
        self.config = config
        self.metrics = metrics
        self.digest = file_digest(self.path)
        if state_dir is None:
            state_dir = config.server.state_dir
        if state_dir is None:
            state_dir = default_state_dir(self.path)
        elif not state_dir.is_absolute():
            state_dir = self.path.parent / state_dir
        self.state_dir = state_dir
        key = hashlib.sha256(str(self.path.absolute()).encode()).hexdigest()[:8]
        self.state_file = state_dir / f"{self.path.name}.{key}.rollbacks.json"
        self.configmap = configmap or os.environ.get(CONFIGMAP_ENV) or "<configmap>"
        if metrics is not None and self.digest is not None:
            metrics.config_applied(self.digest)

    def follow(self, digest: str, config: Config) -> None:
        """The gateway now runs what the file with `digest` says."""
        self.digest, self.config = digest, config
        if self.metrics is not None:
            self.metrics.config_applied(digest)

    def file_percentages(self, model: str) -> tuple[float, float] | None:
        pair = next((pair for pair in self.config.models if pair.name == model), None)
        return None if pair is None else (pair.shadow_percent, pair.serve_percent)

    # -- writing the config file -----------------------------------------------------------

    def persist(self, model: str, shadow_percent: float, serve_percent: float) -> Persistence:
        """Write `model`'s percentages into the config file, or say why not and what would."""
        where = str(self.path)
        try:
            with _locked(self.path.parent):
                text = self.path.read_bytes().decode("utf-8")
                new_text = edit_percentages(text, model, {"shadow_percent": shadow_percent, "serve_percent": serve_percent})
                config = parse_config(yaml.safe_load(new_text), where, base_dir=self.path.parent)
                if new_text == text:
                    return Persistence(True, where)
                reason = read_only_reason(self.path)
                if reason is None:
                    try:
                        write_atomically(self.path, new_text)
                    except OSError as exc:
                        reason = exc.strerror
                if reason is not None:
                    return Persistence(False, where, f"{where} is {reason}", self.kubectl_patch(new_text))
        except (OSError, UnicodeDecodeError, EditError, ConfigError) as exc:
            problem = exc.strerror if isinstance(exc, OSError) else str(exc)
            log.warning("model %s: the change was not written to %s: %s", model, where, problem)
            return Persistence(False, where, f"cannot edit {where}: {problem}")
        if hashlib.sha256(text.encode()).hexdigest() == self.digest:
            self.follow(hashlib.sha256(new_text.encode()).hexdigest(), config)
        # else the file held edits the watcher has not applied yet: it reloads and applies them next
        return Persistence(True, where)

    def kubectl_patch(self, text: str) -> str:
        """The command that puts `text` into the ConfigMap this file is mounted from."""
        namespace = os.environ.get(NAMESPACE_ENV)
        body = json.dumps({"data": {self.path.name: text}})
        return (f"kubectl patch configmap {self.configmap}" + (f" -n {namespace}" if namespace else "")
                + f" --type merge -p {shlex.quote(body)}")

    def describe(self, model: str, shadow_percent: float, serve_percent: float, rolled_back: bool) -> Persistence:
        """Whether what runs now would survive a restart."""
        if rolled_back and model in self._records():
            return Persistence(True, str(self.state_file),
                               "guard rollback kept across restarts until the percentages are changed")
        in_file = self.file_percentages(model)
        if in_file == (shadow_percent, serve_percent):
            return Persistence(True, str(self.path))
        shown = "no such model" if in_file is None else f"shadow {in_file[0]:g}, serve {in_file[1]:g}"
        return Persistence(False, str(self.path), f"{self.path} says {shown}")

    # -- guard rollbacks -------------------------------------------------------------------

    def _records(self) -> dict[str, dict[str, Any]]:
        try:
            return json.loads(self.state_file.read_text())["rollbacks"]
        except FileNotFoundError:
            return {}
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.warning("%s unreadable, guard rollbacks recorded there are lost: %s", self.state_file, exc)
            return {}

    def _update_records(self, model: str, record: dict[str, Any] | None) -> None:
        if record is None and model not in self._records():
            return
        self.state_dir.mkdir(parents=True, exist_ok=True)
        with _locked(self.state_dir):
            records = self._records()
            if record is None and model not in records:
                return
            if record is None:
                del records[model]
            else:
                records[model] = record
            write_atomically(self.state_file, json.dumps({"config": str(self.path.absolute()), "rollbacks": records},
                                                         indent=2) + "\n")

    def record_rollback(self, model: str, reason: str) -> None:
        """Keep a guard rollback across restarts, against the percentages the file says now."""
        try:
            in_file = yaml.safe_load(self.path.read_text(encoding="utf-8"))
            entry = next(item for item in in_file["models"] if item.get("name") == model)
            shadow, serve = (float(entry.get(key, 0)) for key in PERCENT_KEYS)
        except (OSError, yaml.YAMLError, KeyError, TypeError, StopIteration, ValueError):
            shadow, serve = self.file_percentages(model) or (0.0, 0.0)
        try:
            self._update_records(model, {"reason": reason, "shadow_percent": shadow, "serve_percent": serve,
                                         "time_unix": time.time()})
        except OSError as exc:
            log.error("model %s: guard rollback not recorded in %s (%s); a restart serves the candidate again",
                      model, self.state_file, exc.strerror)
            return
        log.info("model %s: guard rollback recorded in %s; it stays in force across restarts until the "
                 "percentages are changed", model, self.state_file)

    def forget_rollback(self, model: str) -> None:
        try:
            self._update_records(model, None)
        except OSError as exc:
            log.error("model %s: could not clear the guard rollback in %s: %s", model, self.state_file, exc.strerror)

    def file_changed(self, model: str, shadow_percent: float, serve_percent: float) -> None:
        """The file now sets these percentages: an operator's change, unless the rollback's own write."""
        record = self._records().get(model)
        if record is not None and (record["shadow_percent"], record["serve_percent"]) != (shadow_percent, serve_percent):
            self.forget_rollback(model)

    def rollbacks_in_force(self) -> dict[str, str]:
        """Guard rollbacks to restore on start, model -> reason; records the file has moved past are dropped."""
        kept = {}
        for model, record in self._records().items():
            if self.file_percentages(model) == (record["shadow_percent"], record["serve_percent"]):
                kept[model] = record["reason"]
            else:
                self.forget_rollback(model)
        return kept
