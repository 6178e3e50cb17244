#!/usr/bin/env python3
"""An example external worker: a standalone script that speaks docs/worker-protocol.md.

It imports nothing from the supervisor: any language that can read and write lines of JSON can
do the same. Each cycle it proposes one low-risk action, "example.write_note"; when the daemon
approves it, it appends a line to the notes file and reports the result. Its state is a counter
of notes written, which the daemon checkpoints and hands back in "hello" after a restart.

The notes file is params.effects_file (from the worker's config), else $EXAMPLE_EFFECTS_FILE,
else ./example_notes.txt.

Rules this script follows (and any worker must):
  * stdout carries protocol messages only, one JSON object per line, flushed at once;
    anything for humans goes to stderr (the daemon logs it line by line);
  * the side effect runs only after a "decision" of "approved" for that proposal's id;
  * end of input (stdin closed) means stop: exit promptly.
"""

from __future__ import annotations

import json
import os
import sys
from datetime import UTC, datetime
from typing import Any

PROTOCOL = 1


def send(message: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(message, separators=(",", ":")) + "\n")
    sys.stdout.flush()


def receive() -> dict[str, Any] | None:
    """The next message from the daemon, or None when it closed our input (time to stop)."""
    line = sys.stdin.readline()
    if not line:
        return None
    message = json.loads(line)
    if not isinstance(message, dict):
        raise SystemExit(f"unexpected input: {line!r}")
    return message


def say(text: str) -> None:
    print(f"example_external: {text}", file=sys.stderr, flush=True)


class NoteWriter:
    def __init__(self) -> None:
        self.name = "?"
        self.params: dict[str, Any] = {}
        self.state: dict[str, Any] = {"notes": 0, "cycles": 0}

    def hello(self, message: dict[str, Any]) -> None:
        if message.get("protocol") != PROTOCOL:
            raise SystemExit(f"unsupported protocol {message.get('protocol')!r}")
        self.name = str(message.get("worker", "?"))
        self.params = dict(message.get("params") or {})
        self.state.update(message.get("state") or {})
        say(f"{self.name} starting with {self.state['notes']} notes written")

    def notes_file(self) -> str:
        return str(
            self.params.get("effects_file")
            or os.environ.get("EXAMPLE_EFFECTS_FILE")
            or "example_notes.txt"
        )

    def cycle(self, message: dict[str, Any]) -> bool:
        """One cycle. False if the daemon went away in the middle of it."""
        number = int(message["cycle"])
        send({"type": "heartbeat"})
        proposal = f"note-{number}"
        send({
            "type": "propose",
            "id": proposal,
            "action": {
                "name": "example.write_note",
                "params": {"cycle": number, "window": message.get("window")},
                "risk": "low",
                "cost": 0.0,
                # One note per cycle number, even if this cycle is replayed after a restart.
                "key": f"note-{number}",
            },
        })  # fmt: skip
        decision = receive()
        if decision is None:
            return False
        if decision.get("type") != "decision" or decision.get("id") != proposal:
            raise SystemExit(f"expected the decision for {proposal}, got {decision!r}")
        verdict = decision.get("decision")
        if verdict == "approved":
            send({"type": "result", "id": proposal, **self.write_note(number, decision)})
        else:
            send({"type": "log", "level": "info",
                  "message": f"note for cycle {number} not written: {verdict} "
                             f"({decision.get('reason')})"})  # fmt: skip
        self.state["cycles"] = int(self.state.get("cycles", 0)) + 1
        send({"type": "cycle_done", "state": self.state})
        return True

    def write_note(self, number: int, decision: dict[str, Any]) -> dict[str, Any]:
        path = self.notes_file()
        line = json.dumps({"worker": self.name, "cycle": number,
                           "command_id": decision.get("command_id"),
                           "at": datetime.now(UTC).isoformat()}) + "\n"  # fmt: skip
        try:
            with open(path, "a", encoding="utf-8") as notes:
                notes.write(line)
        except OSError as exc:
            return {"ok": False, "error": f"cannot write {path}: {exc.strerror or exc}"}
        self.state["notes"] = int(self.state.get("notes", 0)) + 1
        return {"ok": True, "result": {"file": path, "notes": self.state["notes"]}}


def main() -> int:
    worker = NoteWriter()
    while True:
        message = receive()
        if message is None:
            say(f"{worker.name} input closed, stopping")
            return 0
        kind = message.get("type")
        if kind == "hello":
            worker.hello(message)
        elif kind == "cycle":
            if not worker.cycle(message):
                return 0
        else:
            say(f"ignoring unexpected message {kind!r}")


if __name__ == "__main__":
    sys.exit(main())
