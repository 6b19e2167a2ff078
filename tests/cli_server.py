"""A fork server for ``tests.conftest.run_cli``: one process that has imported what every ``towerrec``
command imports (torch, TorchRec, Lightning, the command modules) forks a fresh child per command.

Importing that stack costs about 4.5 s of CPU per process on this machine, more than most of the
small commands the tests run; a forked child starts with the modules already imported and is
otherwise a process of its own (own pid, environment, working directory, stdout/stderr files,
signal dispositions, process group, exit status). The child runs ``towerrec.trainer.cli.main``
exactly as ``python -m towerrec.trainer.cli`` would, then exits as that interpreter would: non-daemon
threads joined, atexit handlers run, the exit status of ``sys.exit`` (1 and the traceback for an
uncaught exception, minus the signal number for a signal).

The server runs no torch operation itself (no thread pool exists when it forks). Protocol: one JSON
request a line on stdin ``{"args", "env", "cwd", "stdout", "stderr"}``; the server answers
``{"pid": N}`` when the child starts and ``{"returncode": N}`` when it ends, one line each.
"""

from __future__ import annotations

import json
import os
import signal
import sys


def _preload() -> None:
    from towerrec.trainer.cli import main  # noqa: F401
    from towerrec.trainer.commands import COMMANDS

    for command in COMMANDS.values():
        command.load()


def _child(request: dict) -> None:
    """Runs in the forked child; never returns."""
    code = 1
    try:
        os.setsid()  # its own process group: a timeout kills the command and whatever it started
        for signum in (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2):  # as in a new interpreter
            signal.signal(signum, signal.SIG_DFL)
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(request["env"])
        stdin = os.open(os.devnull, os.O_RDONLY)
        os.dup2(stdin, 0)
        for fd, path in ((1, request["stdout"]), (2, request["stderr"])):
            target = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.dup2(target, fd)
            os.close(target)
        from towerrec.trainer import cli

        sys.argv = [cli.__file__, *request["args"]]
        try:
            code = cli.main(request["args"])
        except SystemExit as exit_:
            code = exit_.code
        except BaseException:
            sys.excepthook(*sys.exc_info())
            code = 1
        if code is None:
            code = 0
        elif not isinstance(code, int):
            print(code, file=sys.stderr)
            code = 1
        import atexit
        import threading

        threading._shutdown()  # as the interpreter does at exit: wait for non-daemon threads
        atexit._run_exitfuncs()
    except BaseException:
        sys.excepthook(*sys.exc_info())
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:  # noqa: BLE001 - exiting anyway
                pass
        os._exit(code & 0xFF)


def serve() -> None:
    _preload()
    for line in sys.stdin:
        request = json.loads(line)
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            _child(request)
        print(json.dumps({"pid": pid}), flush=True)
        _, status = os.waitpid(pid, 0)
        print(json.dumps({"returncode": os.waitstatus_to_exitcode(status)}), flush=True)


if __name__ == "__main__":
    serve()
