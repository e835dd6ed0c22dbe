"""A fork server for the tests' console-script runs (``tests.conftest.run_cli``).

Every ``xmodal-*`` command the suite runs used to start a fresh interpreter that imported torch,
Lightning and Hydra again: ~6 s of CPU each, measured, for ~70 runs, about a third of the suite's
CPU time on 2 cores. This server imports them once, then forks one child per command. The child
becomes what the console script would have been: its own session, the request's working
directory, environment, ``sys.argv`` (``argv[0]`` the installed script, so Lightning starts DDP
ranks as fresh ``python <script> ...`` processes exactly as for a user), stdin from /dev/null,
stdout/stderr into the files the test reads, the entry point called as the script calls it, and
a normal interpreter exit (atexit handlers run) with the entry point's status.

Protocol (one request per connection, JSON lines over a Unix socket): the client sends
``{"script", "argv", "cwd", "env", "stdout", "stderr"}``; the server answers the child's pid, then
its exit status (``subprocess`` semantics: ``-N`` for signal N).

Run as a file (``python tests/cli_server.py SOCKET``), not ``-m``: Lightning builds a rank's command
from ``__main__.__spec__``, which must be None as for a console script.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
import traceback
from importlib.metadata import entry_points
from typing import Any


def _entry_point(script: str) -> Any:
    found = [ep for ep in entry_points(group="console_scripts") if ep.name == os.path.basename(script)]
    return found[0].load()


def _run_child(request: dict[str, Any]) -> int:
    """In the forked child: become the console-script process and run it; its exit status."""
    os.setsid()  # a group of its own: a timeout kills it and the ranks it started
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    sys.argv = [request["script"], *request["argv"]]
    sys.path[0] = os.path.dirname(request["script"])  # as for the script: its bin dir, not tests/
    for fd, path, mode in (
        (0, os.devnull, os.O_RDONLY),
        (1, request["stdout"], os.O_WRONLY),
        (2, request["stderr"], os.O_WRONLY),
    ):
        target = os.open(path, mode)
        os.dup2(target, fd)
        os.close(target)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        status = _entry_point(request["script"])()  # the script does sys.exit(main())
    except SystemExit as stop:
        status = stop.code
    except BaseException:  # what the interpreter does with an uncaught exception
        traceback.print_exc()
        return 1
    if status is None or isinstance(status, int):
        return status or 0
    print(status, file=sys.stderr)
    return 1


def serve(path: str) -> int:
    """Answer requests until the client closes the socket; in a forked child, its exit status."""
    # What every xmodal command imports, imported once (the point of this server).
    import xmodal.data.cli  # noqa: F401
    import xmodal.entry  # noqa: F401
    import xmodal.evaluate  # noqa: F401
    import xmodal.generate  # noqa: F401
    import xmodal.train  # noqa: F401

    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(path)
    server.listen(1)
    server.settimeout(1.0)
    parent = os.getppid()
    print("ready", flush=True)
    quiet = os.open(os.devnull, os.O_WRONLY)  # nobody reads the pipe after this line: never block on it
    os.dup2(quiet, 1)
    os.close(quiet)
    while True:
        try:
            conn, _ = server.accept()
        except TimeoutError:
            if os.getppid() != parent:
                return 0  # the test process is gone: so is the need for this server
            continue
        conn.settimeout(None)
        with conn, conn.makefile("rwb") as stream:
            line = stream.readline()
            if not line:
                return 0  # the client is gone: shut down
            request = json.loads(line)
            sys.stdout.flush()
            sys.stderr.flush()
            pid = os.fork()
            if pid == 0:
                server.close()
                return _run_child(request)
            stream.write(f"{pid}\n".encode())
            stream.flush()
            _, status = os.waitpid(pid, 0)
            stream.write(f"{os.waitstatus_to_exitcode(status)}\n".encode())
            stream.flush()


if __name__ == "__main__":
    sys.exit(serve(sys.argv[1]))
