"""The demo's narration: the step under way, and the lines each hop says about it. Nothing
printed is a whole token or key: SHA-256 fingerprints and masked forms only."""

from __future__ import annotations

import hashlib
import threading
from dataclasses import dataclass
from typing import TextIO


@dataclass
class StepOutcome:
    name: str  # a SCRIPT step name, or "passthrough"
    title: str
    exchange: str | None = None  # "mint", "static", an OAuth error code; None: no exchange
    upstream: str | None = None  # the upstream called; None when none was
    upstream_status: int | None = None
    reason: str = ""  # why the upstream accepted or refused


def fingerprint(secret: str) -> str:
    return "sha256:" + hashlib.sha256(secret.encode()).hexdigest()[:12]


def masked(key: str) -> str:
    return f"{key[:3]}...{key[-4:]}"


class Story:
    """The narration, and the step under way (the calls are sequential: one step at a time)."""

    def __init__(self, out: TextIO) -> None:
        self.out, self.steps, self._lock = out, [StepOutcome("setup", "")], threading.Lock()

    @property
    def step(self) -> StepOutcome:
        return self.steps[-1]

    def begin(self, name: str, title: str) -> None:
        self.steps.append(StepOutcome(name, title))
        self.say(f"\n[{len(self.steps) - 1}] {title}")

    def say(self, line: str, who: str | None = None) -> None:
        """A line; with ``who``, a hop's line, its text in a column of its own."""
        with self._lock:
            print(line if who is None else f"  {who:<24}{line}", file=self.out, flush=True)

    def more(self, line: str) -> None:
        self.say(f"  {line}", "")

    def verdict(self, who: str, reason: str) -> None:
        self.step.reason = reason
        self.say(reason, who)
