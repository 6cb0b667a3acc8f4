"""Site agent and aggregator processes forked from one interpreter that has already imported them.

A site agent process spends 4-7 s of CPU importing torch, MONAI and Opacus before it does
anything; the federation tests start about twenty of them on two cores, which made those
imports a fifth of the suite's CPU. The zygote is a single-threaded Python process that
imports the site agent once and then forks one child per ``fedmq ...`` command asked of it.
Each child is a separate process with its own pid, session, environment, working directory,
log file, signals and exit status, running the same ``fedmq.shared.cli.main`` a fresh
interpreter would; only the interpreter start and the imports are shared. Tests inject it
(``Federation(spawner=...)``); nothing in fedmq uses it, and commands other than
``python -m fedmq.shared.cli ...`` (the fault driver's crash launcher) still get a fresh
process.

Protocol: JSON lines. The test process writes ``{"id", "argv", "env", "cwd", "log"}`` to the
zygote's stdin; the zygote answers ``{"id", "pid"}`` (or ``{"id", "error"}``) and, whenever a
child ends, ``{"exited": pid, "code": returncode}`` (negative: the signal, as ``Popen``). The
zygote waits on stdin and a SIGCHLD wake-up pipe with ``select``: no thread, so a fork never
copies a lock another thread holds.
"""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import tempfile
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import IO, Any, Protocol

ROOT = Path(__file__).resolve().parents[2]
#: the modules a child may run (``python -m MODULE ...``): the CLI, and the test launcher that
#: injects crash hooks around it (tests/launcher.py)
MODULES = ("fedmq.shared.cli", "tests.launcher")


class ProcessLike(Protocol):
    pid: int
    returncode: int | None

    def poll(self) -> int | None: ...

    def wait(self, timeout: float | None = None) -> int: ...

    def send_signal(self, sig: int) -> None: ...

    def terminate(self) -> None: ...

    def kill(self) -> None: ...


def popen_spawner(argv: Sequence[str], env: Mapping[str, str], log: IO[bytes]) -> subprocess.Popen[bytes]:
    """A fresh interpreter (what fedmq itself does)."""
    return subprocess.Popen(list(argv), stdout=log, stderr=subprocess.STDOUT, env=dict(env), start_new_session=True)


class ZygoteProcess:
    """A forked child, driven like ``subprocess.Popen``."""

    def __init__(self, zygote: Zygote, pid: int) -> None:
        self._zygote = zygote
        self.pid = pid
        self.returncode: int | None = None
        self.args = ["<zygote>", str(pid)]

    def poll(self) -> int | None:
        if self.returncode is None:
            self.returncode = self._zygote.exit_code(self.pid)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        code = self._zygote.wait_exit(self.pid, timeout)
        if code is None:
            raise subprocess.TimeoutExpired(self.args, timeout or 0.0)
        self.returncode = code
        return code

    def send_signal(self, sig: int) -> None:
        if self.poll() is None:
            try:
                os.kill(self.pid, sig)
            except ProcessLookupError:
                pass

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


class Zygote:
    """One zygote process and the thread that reads its answers."""

    def __init__(self) -> None:
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "tests")]),
                   OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1")
        self._proc = subprocess.Popen([sys.executable, "-m", "testkit.zygote"], stdin=subprocess.PIPE,
                                      stdout=subprocess.PIPE, env=env, cwd=ROOT)
        self._cond = threading.Condition()
        self._answers: dict[int, dict[str, Any]] = {}
        self._exits: dict[int, int] = {}
        self._next_id = 0
        self._dead = False
        self._reader = threading.Thread(target=self._read, name="zygote-reader", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self._proc.stdout is not None
        for line in self._proc.stdout:
            msg = json.loads(line)
            with self._cond:
                if "exited" in msg:
                    self._exits[int(msg["exited"])] = int(msg["code"])
                else:
                    self._answers[int(msg["id"])] = msg
                self._cond.notify_all()
        with self._cond:
            self._dead = True
            self._cond.notify_all()

    def spawn(self, argv: Sequence[str], env: Mapping[str, str], log: IO[bytes], *, err: str | None = None,
              cwd: str | os.PathLike[str] | None = None) -> ProcessLike:
        """``argv`` as ``[python, "-m", MODULE, *args]`` (MODULE one of ``MODULES``) is forked
        from the zygote; anything else is started as a fresh process. stdout and stderr go to
        ``log``; ``err``: stderr to that file instead; ``cwd``: the working directory (ours
        when None)."""
        argv = list(argv)
        if len(argv) < 3 or argv[1] != "-m" or argv[2] not in MODULES or self._dead:
            if err is None and cwd is None:
                return popen_spawner(argv, env, log)
            with open(err or os.devnull, "ab") as err_file:
                return subprocess.Popen(argv, stdout=log, stderr=err_file if err else subprocess.STDOUT, env=dict(env),
                                        cwd=cwd, start_new_session=True)
        assert self._proc.stdin is not None
        with self._cond:
            req_id = self._next_id = self._next_id + 1
            req = {"id": req_id, "module": argv[2], "argv": argv[3:], "env": dict(env), "cwd": os.fspath(cwd or os.getcwd()),
                   "log": log.name, "err": err or log.name}
            self._proc.stdin.write((json.dumps(req) + "\n").encode())
            self._proc.stdin.flush()
            while req_id not in self._answers and not self._dead:
                self._cond.wait(30)
            answer = self._answers.pop(req_id, None)
        if answer is None or "pid" not in answer:
            raise RuntimeError(f"the zygote could not start {argv[3:]}: {answer}")
        return ZygoteProcess(self, int(answer["pid"]))

    __call__ = spawn

    def run(self, argv: Sequence[str], env: Mapping[str, str], *, timeout: float) -> subprocess.CompletedProcess[str]:
        """``subprocess.run(argv, env=env, capture_output=True, text=True, timeout=timeout)``,
        the child forked from the zygote (stdout and stderr each to a file, read back)."""
        with tempfile.TemporaryDirectory(prefix="fedmq-zygote-") as d:
            out, err = Path(d) / "stdout", Path(d) / "stderr"
            with open(out, "ab") as log:
                proc = self.spawn(argv, env, log, err=str(err))
                try:
                    code = proc.wait(timeout)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(30)
                    raise
            text = (lambda p: p.read_text(errors="replace") if p.exists() else "")
            return subprocess.CompletedProcess(list(argv), code, text(out), text(err))

    def exit_code(self, pid: int) -> int | None:
        with self._cond:
            return self._exits.get(pid)

    def wait_exit(self, pid: int, timeout: float | None) -> int | None:
        with self._cond:
            self._cond.wait_for(lambda: pid in self._exits or self._dead, timeout)
            return self._exits.get(pid)

    def close(self) -> None:
        if self._proc.stdin is not None:
            try:
                self._proc.stdin.close()
            except OSError:
                pass
        try:
            self._proc.wait(30)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()


# ------------------------------------------------------------------------------ the zygote


def _child(req: dict[str, Any], own_fds: Sequence[int]) -> None:
    """In the forked child: become the requested command; ends the process (thread joins and
    atexit handlers run as in a fresh interpreter)."""
    code = 1
    try:
        for fd in own_fds:
            os.close(fd)
        os.setsid()
        os.chdir(req["cwd"])
        os.environ.clear()
        os.environ.update(req["env"])
        for sig in (signal.SIGCHLD, signal.SIGTERM, signal.SIGINT, signal.SIGPIPE):
            signal.signal(sig, signal.SIG_DFL if sig != signal.SIGINT else signal.default_int_handler)
        signal.set_wakeup_fd(-1)
        null = os.open(os.devnull, os.O_RDONLY)
        log = os.open(req["log"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        err = os.open(req["err"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        os.dup2(null, 0)
        os.dup2(log, 1)
        os.dup2(err, 2)
        for fd in (null, log, err):
            os.close(fd)
        sys.stdin = open(0, closefd=False)  # noqa: SIM115 - fresh objects: none of the zygote's buffers
        sys.stdout = open(1, "w", buffering=1, closefd=False)  # noqa: SIM115
        sys.stderr = open(2, "w", buffering=1, closefd=False)  # noqa: SIM115
        import random

        random.seed()  # every child would otherwise share the zygote's random state
        import runpy

        sys.argv = [req["module"], *req["argv"]]
        runpy.run_module(req["module"], run_name="__main__", alter_sys=True)
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except BaseException:  # noqa: BLE001 - reported in the child's log, like an uncaught error
        import traceback

        traceback.print_exc()
        code = 1
    _exit_like_a_fresh_interpreter(code)


def _exit_like_a_fresh_interpreter(code: int) -> None:
    """What a fresh interpreter does on its way out, in its order: wait for the threads that
    are not daemons, run the atexit handlers (logging's flush, weakref finalizers, temporary
    files), flush stdout and stderr; then leave without finalizing the modules the zygote
    preloaded. Tearing down torch, MONAI and TenSEAL took about 1.5 s of CPU per child (a
    forked ``--help`` took 1.5 s), some thirty times in a make test."""
    import atexit
    import threading

    try:
        threading._shutdown()  # type: ignore[attr-defined]  # what Py_FinalizeEx calls first
    except BaseException:  # noqa: BLE001 - as at a fresh interpreter's exit: reported, not fatal
        import traceback

        traceback.print_exc()
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)


def _serve() -> int:
    import importlib

    # torch, MONAI, Opacus, TenSEAL and the aggregator's modules: once for every child
    for module in ("fedmq.shared.cli", "fedmq.site_agent.service", "fedmq.experiments.testkit",
                   "fedmq.aggregator.cli", "fedmq.aggregator.consumer"):
        importlib.import_module(module)

    rfd, wfd = os.pipe()
    os.set_blocking(wfd, False)
    signal.set_wakeup_fd(wfd)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    out = sys.stdout.buffer
    stdin_fd = sys.stdin.fileno()
    pending = b""

    def send(msg: dict[str, Any]) -> None:
        out.write((json.dumps(msg) + "\n").encode())
        out.flush()

    while True:
        try:
            ready, _, _ = select.select([stdin_fd, rfd], [], [])
        except InterruptedError:
            continue
        if rfd in ready:
            os.read(rfd, 4096)
        while True:  # reap every child that ended
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            send({"exited": pid, "code": os.waitstatus_to_exitcode(status)})
        if stdin_fd in ready:
            data = os.read(stdin_fd, 1 << 16)
            if not data:
                # the test process is done with us: leave at once. An orderly exit of an
                # interpreter holding torch, MONAI and TenSEAL took about 3 s, at the end of
                # every xdist worker; the children run their own exits, and ours has nothing
                # to write but the stdout just flushed.
                out.flush()
                os._exit(0)
            pending += data
            while b"\n" in pending:
                line, pending = pending.split(b"\n", 1)
                req = json.loads(line)
                try:
                    pid = os.fork()
                except OSError as exc:
                    send({"id": req["id"], "error": str(exc)})
                    continue
                if pid == 0:
                    _child(req, (rfd, wfd))
                send({"id": req["id"], "pid": pid})


if __name__ == "__main__":
    sys.exit(_serve())
