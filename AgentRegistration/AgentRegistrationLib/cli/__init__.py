"""``agentreg``: the engine's command line. ``parser`` defines every subcommand and option, ``commands`` holds the
thin commands that check their inputs and call a stage; :func:`main` runs one and turns user errors into one message
and an exit status."""

from __future__ import annotations

import atexit
import os
import sys

from AgentRegistrationLib.cli.parser import build_parser
from AgentRegistrationLib.contract import messages


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    if getattr(args, "workers", None) == 0:
        args.workers = os.cpu_count() or 1
    try:
        return args.func(args)
    except BrokenPipeError:  # the reader went away (e.g. 'agentreg info MODEL | head'): stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error when Python flushes
        return 141  # the shell's status of a process ended by a broken pipe (128 + SIGPIPE)
    except (ValueError, OSError, RuntimeError) as err:
        if getattr(args, "progress_json", False):
            print(messages.encode(messages.error_message(str(err))), flush=True)
        print(f"agentreg: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        if args.command in RESUMABLE:
            print("agentreg: interrupted; cached results are kept, rerun the same command to resume", file=sys.stderr)
        else:
            print("agentreg: interrupted; no output was written (its files are written only once all are complete)",
                  file=sys.stderr)
        return 130


def run() -> None:
    """The ``agentreg`` command: :func:`main`, then a quick exit. Once the command has returned, its files are
    complete; the exit handlers run (temporary folders are removed), the streams are flushed, and the process ends
    without the interpreter's teardown of torch and the other modules, which took a second of a registration's
    five (issue 27)."""
    code = main()
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


RESUMABLE = ("groundtruth", "train", "evaluate", "register-many")
"""The commands that keep their finished work when interrupted (per-pair caches, checkpoints) and resume it."""

