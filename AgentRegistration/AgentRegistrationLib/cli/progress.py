"""Progress of a command: a tqdm bar on a terminal, or one JSON line per update for the Slicer worker
(``--progress-json``, :mod:`AgentRegistrationLib.contract.messages`)."""

from __future__ import annotations

import sys

from AgentRegistrationLib.contract import messages


class Reporter:
    """Progress on stderr (tqdm) or as JSON lines on stdout, in the format of ``protocol`` (messages)."""

    def __init__(self, stage: str, total: int, json_lines: bool, delay: float = 0.0):
        self.json_lines = json_lines
        self.delay = delay  # seconds before a bar appears (a quick stage shows none)
        self.bar = None
        self.begin(stage, total, announce=False)

    def begin(self, stage: str, total: int, announce: bool = True, organ: str | None = None) -> None:
        """Start reporting ``stage`` (``total`` units; 0: one piece of work of unknown length, shown as busy); its
        title names the model's ``organ`` where it speaks of the organ (:func:`messages.stage_title`)."""
        self.close()
        self.stage, self.total = stage, total
        if self.json_lines:
            if announce:
                print(messages.encode(messages.progress_message(stage, 0, total, **({"organ": organ} if organ else {}))),
                      flush=True)
        elif total > 0:
            from tqdm import tqdm  # only for a bar on a terminal (not for the Slicer worker's JSON lines)
            self.bar = tqdm(total=total, desc=stage, file=sys.stderr, dynamic_ncols=True, delay=self.delay)
        elif announce:
            print(f"{messages.stage_title(stage, organ)} ...", file=sys.stderr, flush=True)

    def update(self, done: int, **info) -> None:
        if self.json_lines:
            print(messages.encode(messages.progress_message(self.stage, done, self.total, **info)), flush=True)
        elif self.bar is not None:
            if info:
                self.bar.set_postfix({k: (f"{v:.3g}" if isinstance(v, float) else v) for k, v in info.items()},
                                     refresh=False)
            self.bar.update(done - self.bar.n)  # shown at most every 0.1 s, and not before ``delay``

    def message(self, text: str) -> None:
        if self.json_lines:
            print(messages.encode(messages.text_message(self.stage, text)), flush=True)
        else:
            (self.bar.write if self.bar else print)(text, file=sys.stderr)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
