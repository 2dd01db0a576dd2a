"""Run an entry script's ``main(argv)`` inside the test process and return what a subprocess would have given.

Refusals end before any model loads, so a subprocess spends nearly all of its ~7 s importing torch and
diffusers. Each user path keeps one real subprocess (``run_script``); its further refusal cases run here,
with the same argv, the same exit codes (argparse's 2, ours 1) and the same stdout/stderr text, so
``assert_one_error_line`` reads both alike. An unexpected exception becomes a traceback on stderr, as it
would in a subprocess, and fails that check.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import logging
import subprocess
import sys
import traceback
from collections.abc import Sequence


def _module_name(script: str) -> str:
    return script.removesuffix(".py").replace("/", ".")


@contextlib.contextmanager
def _root_logger_restored():
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    try:
        yield
    finally:
        for handler in [h for h in root.handlers if h not in handlers]:
            root.removeHandler(handler)
            handler.close()
        root.setLevel(level)


@contextlib.contextmanager
def _argv(script: str, argv: list[str]):
    """sys.argv as the script would see it: argparse names the program after sys.argv[0] in its errors."""
    saved = sys.argv
    sys.argv = [script, *argv]
    try:
        yield
    finally:
        sys.argv = saved


def run_main_in_process(script: str, args: Sequence[object]) -> subprocess.CompletedProcess:
    """``python script ARGS`` as a call of the script module's ``main``; returns a CompletedProcess."""
    argv = [str(arg) for arg in args]
    main = importlib.import_module(_module_name(script)).main
    stdout, stderr = io.StringIO(), io.StringIO()
    with _root_logger_restored(), _argv(script, argv), contextlib.redirect_stdout(stdout), \
            contextlib.redirect_stderr(stderr):
        try:
            code = main(argv)
        except SystemExit as exit_:
            code = exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
        except BaseException:  # noqa: BLE001 - a subprocess would print it and exit 1
            traceback.print_exc(file=stderr)
            code = 1
    return subprocess.CompletedProcess([script, *argv], int(code or 0), stdout.getvalue(), stderr.getvalue())
