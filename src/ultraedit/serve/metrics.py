"""Counters and gauges of the server in the Prometheus text format (version 0.0.4)."""

from __future__ import annotations

import threading
from collections import defaultdict
from typing import Callable

_HELP = {
    "ultraedit_http_requests_total": ("counter", "HTTP requests answered, by route and status code"),
    "ultraedit_prompt_tokens_total": ("counter", "prompt tokens of generation requests"),
    "ultraedit_generated_tokens_total": ("counter", "tokens generated"),
    "ultraedit_edits_submitted_total": ("counter", "edit requests accepted into the queue"),
    "ultraedit_edits_applied_total": ("counter", "edit requests applied in saved turns"),
    "ultraedit_edits_failed_total": ("counter", "edit requests whose turn failed"),
    "ultraedit_edits_reverted_total": ("counter", "edit requests undone by reverts"),
    "ultraedit_turns_total": ("counter", "turns applied and saved by this process"),
    "ultraedit_turn_seconds": ("summary", "seconds from a turn's start to its weights being served (compute + save)"),
}


class Metrics:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._values: dict[tuple[str, tuple[tuple[str, str], ...]], float] = defaultdict(float)
        self.gauges: dict[str, tuple[str, Callable[[], float]]] = {}

    def add(self, name: str, value: float = 1.0, **labels: str) -> None:
        with self._lock:
            self._values[(name, tuple(sorted(labels.items())))] += value

    def observe(self, name: str, seconds: float) -> None:
        self.add(f"{name}_sum", seconds)
        self.add(f"{name}_count", 1)

    def gauge(self, name: str, help_text: str, read: Callable[[], float]) -> None:
        self.gauges[name] = (help_text, read)

    def value(self, name: str, **labels: str) -> float:
        with self._lock:
            return self._values.get((name, tuple(sorted(labels.items()))), 0.0)

    def render(self) -> str:
        with self._lock:
            values = dict(self._values)
        lines = []
        for name, (kind, help_text) in _HELP.items():
            lines += [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}"]
            suffixes = ("_sum", "_count") if kind == "summary" else ("",)
            rows = [(n, labels, v) for (n, labels), v in values.items() if n in {name + s for s in suffixes}]
            if not rows and kind != "summary":
                rows = [(name, (), 0.0)] if name != "ultraedit_http_requests_total" else []
            for metric, labels, value in sorted(rows):
                lines.append(f"{metric}{_labels(labels)} {_number(value)}")
        for name, (help_text, read) in self.gauges.items():
            lines += [f"# HELP {name} {help_text}", f"# TYPE {name} gauge", f"{name} {_number(read())}"]
        return "\n".join(lines) + "\n"


def _labels(labels: tuple[tuple[str, str], ...]) -> str:
    if not labels:
        return ""
    inner = ",".join(f'{k}="{_escape(v)}"' for k, v in labels)
    return "{" + inner + "}"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(float(value))
