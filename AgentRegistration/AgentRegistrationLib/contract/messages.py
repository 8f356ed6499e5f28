"""Worker progress messages: one JSON object per stdout line of an ``agentreg`` worker (``--progress-json``),
printed by the engine and read by the Slicer modules. Standard library only."""

from __future__ import annotations

import json
from typing import Any

# ====================================================================================== messages
# Every line a worker prints on stdout with --progress-json is one JSON object with a "stage":
#   {"stage": S, "done": N, "total": T, **numbers}   progress of stage S (register, preprocess,
#                                                     groundtruth, train, elastix, agent, ...)
#   {"stage": S, "message": TEXT}                    a note of stage S
#   {"stage": "error", "message": TEXT}              a user error; the worker then exits with 1
#   {"stage": "done", **payload}                     the last line of a successful command
# A line that is not such an object is kept as {"stage": "log", "message": LINE}.

STAGE_ERROR = "error"
STAGE_DONE = "done"
STAGE_LOG = "log"

STAGE_TITLES = {
    "read": "Reading the images and the model",
    "localise": "Finding the organ and cropping",
    "prealign": "Pre-aligning (translation) and cropping",
    "register": "Registering",
    "resample": "Warping onto the fixed image",
    "write": "Writing the results",
    "preprocess": "Preparing the subjects",
    "groundtruth": "Ground-truth deformations",
    "sdm": "Statistical deformation model",
    "localiser": "Training the organ localiser",
    "train": "Training",
    "elastix": "Elastix",
    "agent": "Agent",
}
"""What the status line calls each stage; a stage not listed shows its own name. ``agentreg register`` reports
read, localise (a model that crops on the organ) or prealign (the paper's), register (agent steps), resample and
write, in this order; a stage with ``total`` 0 is one piece of work of unknown length (a busy indicator)."""


def stage_title(stage: str, organ: str | None = None) -> str:
    """What the status line calls ``stage`` (:data:`STAGE_TITLES`), naming the model's ``organ`` where the title
    speaks of the organ (``localise`` with ``organ="prostate"`` -> ``Finding the prostate and cropping``); a progress
    message may carry the organ as ``"organ"``."""
    title = STAGE_TITLES.get(stage, stage)
    return title.replace("the organ", f"the {organ}") if organ else title


REGISTER_STAGES = ("read", "localise", "prealign", "register", "resample", "write")
"""The stages of ``agentreg register`` (localise and prealign are alternatives)."""

INFO_LABELS = {"loss": "loss", "accuracy": "accuracy", "val_dice": "validation Dice", "dice": "Dice"}
"""Numbers a progress message may carry, in the order they are shown, with their labels."""


def progress_message(stage: str, done: int, total: int, **info: Any) -> dict[str, Any]:
    """A progress message: ``done`` of ``total`` units of ``stage``, plus numbers such as loss or dice."""
    return {"stage": stage, "done": int(done), "total": int(total), **info}


def text_message(stage: str, text: str) -> dict[str, Any]:
    """A note attached to a stage (e.g. a ground-truth pair that failed)."""
    return {"stage": stage, "message": str(text)}


def error_message(text: str) -> dict[str, Any]:
    """The message of a user error, printed just before the worker exits with status 1."""
    return {"stage": STAGE_ERROR, "message": str(text)}


def done_message(**payload: Any) -> dict[str, Any]:
    """The last message of a successful command."""
    return {"stage": STAGE_DONE, **payload}


def encode(message: dict[str, Any]) -> str:
    """One stdout line (without the newline) for a message."""
    return json.dumps(message)


def parse_progress_line(line: str) -> dict[str, Any]:
    """One stdout line of the worker as a message; other lines become ``{"stage": "log", "message": line}``."""
    text = line.strip()
    try:
        message = json.loads(text)
    except json.JSONDecodeError:
        return {"stage": STAGE_LOG, "message": text}
    if not isinstance(message, dict) or not isinstance(message.get("stage"), str):
        return {"stage": STAGE_LOG, "message": text}
    return message


def progress_fraction(message: dict[str, Any]) -> float | None:
    """Fraction done (0..1) of a progress message; None when it carries no count (busy indicator)."""
    total, done = message.get("total"), message.get("done")
    if not isinstance(total, (int, float)) or not isinstance(done, (int, float)) or total <= 0:
        return None
    return min(max(float(done) / float(total), 0.0), 1.0)


def progress_range(message: dict[str, Any]) -> tuple[int, int, int] | None:
    """What a progress bar shows for a message: ``(minimum, maximum, value)``; ``(0, 0, 0)`` is Qt's busy
    indicator (a stage of unknown length); ``None``: leave the bar as it is (logs, notes, done, errors)."""
    stage = message.get("stage")
    if stage in (STAGE_ERROR, STAGE_DONE, STAGE_LOG) or "message" in message or "total" not in message:
        return None
    fraction = progress_fraction(message)
    if fraction is None:
        return (0, 0, 0)
    total = int(message["total"])
    return (0, total, round(fraction * total))


def _number(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def progress_text(message: dict[str, Any]) -> str:
    """The status line a widget shows for one worker message.

    ``{"stage": "register", "done": 5, "total": 41}`` -> ``Registering: 5 / 41``;
    ``{"stage": "train", "done": 150, "total": 2000, "loss": 0.0123, "accuracy": 0.41}`` ->
    ``Training: 150 / 2000, loss 0.0123, accuracy 0.41``; an error -> ``Error: ...``.
    """
    stage = str(message.get("stage", ""))
    if stage == STAGE_ERROR:
        return f"Error: {message.get('message', '')}"
    if stage == STAGE_DONE:
        return "Done"
    if stage == STAGE_LOG:
        return str(message.get("message", ""))
    title = stage_title(stage, message.get("organ") if isinstance(message.get("organ"), str) else None)
    if "message" in message:
        return f"{title}: {message['message']}"
    parts = []
    if isinstance(message.get("done"), (int, float)) and isinstance(message.get("total"), (int, float)) \
            and message["total"] > 0:
        parts.append(f"{message['done']} / {message['total']}")
    parts += [f"{label} {_number(message[key])}" for key, label in INFO_LABELS.items()
              if isinstance(message.get(key), (int, float)) and not isinstance(message.get(key), bool)]
    return f"{title}: {', '.join(parts)}" if parts else title
