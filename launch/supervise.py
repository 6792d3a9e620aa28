"""How `moeyard train` runs a launcher program (torchrun, mpiexec): stop signals, its output, its end.

- Stop signals. SIGTERM or SIGINT (Ctrl-C) to `moeyard` goes to every rank, which finishes its step, saves
  and exits (train/guard.py). The ranks are signalled one by one: torchrun starts each worker in a session of
  its own, so no process-group signal reaches them. The launcher program itself is left alone while ranks
  run: torchrun's agent kills workers still saving after 30 s, and mpiexec kills its ranks at once. A rank
  that appears after the signal is signalled too; past launcher.timeout_s, or at a second signal, whatever
  is left of the job is killed.
- Nothing is left running. Every process of the job inherits MOEYARD_JOB=<token> in its environment, which
  (unlike a parent pid) survives a launcher that dies first; what still carries it once the launcher program
  has ended is killed. Linux only (/proc); elsewhere only the launcher program's own group is signalled.
- Output. The launcher program's stderr is echoed, except Python tracebacks, torchelastic's failure summaries
  and its log lines, which go to RUN_DIR/logs/launcher.log: a failure, or a stop, ends in one line of ours.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

from moeyard.launch.entry import RANK_ARGS
from moeyard.train.guard import STOP_SIGNALS

JOB_TOKEN = "MOEYARD_JOB"
POLL_S = 0.2
RULE = "=" * 20  # torchelastic's failure summary sits between two such rules
ELASTIC_LOG = re.compile(r"^\[?[IWEF]\d{4} [\d:.]+ +\d+ \S*torch/distributed/(elastic|run)")
CHAINED = ("During handling of the above exception", "The above exception was the direct cause")


def job_processes(token: str) -> dict[int, bool]:
    """pid -> whether it is a rank, for every process that carries MOEYARD_JOB=token (readable ones only)."""
    proc, marker, found = Path("/proc"), f"{JOB_TOKEN}={token}".encode(), {}
    rank_args = [arg.encode() for arg in RANK_ARGS]  # `PYTHON -P -m moeyard.launch.rank`, not a launcher naming it
    for entry in proc.iterdir() if proc.is_dir() else ():
        if not entry.name.isdigit():
            continue
        try:
            environ = (entry / "environ").read_bytes().split(b"\0")
            cmdline = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:  # gone meanwhile, or another user's
            continue
        if marker in environ:
            found[int(entry.name)] = cmdline[1 : 1 + len(rank_args)] == rank_args
    return found


def send(pid: int, signum: int, group: bool = False) -> None:
    """os.kill / os.killpg, for a process that may have ended meanwhile."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        (os.killpg if group else os.kill)(pid, signum)


class OutputFilter:
    """Echoes the launcher program's stderr lines, holding back tracebacks, torchelastic's failure summaries
    and log lines; remembers the lines `notable` matches, which explain a failure."""

    def __init__(self, notable: re.Pattern[str]) -> None:
        self.notable_pattern = notable
        self.notable: list[str] = []
        self.held: list[str] = []
        self._inside: str | None = None  # "traceback" or "summary" while inside one

    def feed(self, line: str) -> None:
        if self.notable_pattern.search(line):
            self.notable.append(line.rstrip("\n"))
        if self._hold(line.rstrip("\n")):
            self.held.append(line)
        else:
            sys.stderr.write(line)
            sys.stderr.flush()

    def _hold(self, text: str) -> bool:
        if self._inside == "traceback":
            if not text or text[0].isspace():
                return True
            self._inside = None  # the exception's line ends it
            return True
        if self._inside == "summary":
            if text.startswith(RULE):
                self._inside = None
            return True
        if text.startswith("Traceback (most recent call last):"):
            self._inside = "traceback"
            return True
        if text.startswith(RULE):
            self._inside = "summary"
            return True
        return not text or text.startswith(CHAINED) or bool(ELASTIC_LOG.match(text))

    def write_held(self, path: Path) -> None:
        if self.held:
            path.parent.mkdir(parents=True, exist_ok=True)
            with path.open("a") as log:
                log.writelines(self.held)


class Supervisor:
    """Runs one launcher program; forwards stop signals to the job's ranks; leaves nothing of the job running."""

    def __init__(self, grace_s: float) -> None:
        self.grace_s = grace_s
        self.token = uuid.uuid4().hex
        self.signum: int | None = None
        """The first stop signal `moeyard` received, forwarded to the ranks."""
        self._deadline = float("inf")
        self._signalled: set[int] = set()
        self._done = threading.Event()
        self._proc: subprocess.Popen | None = None

    def run(self, cmd: list[str], env: dict[str, str], output: OutputFilter) -> int:
        """Runs `cmd` to its end (and the job's processes with it); returns its exit status."""
        main = threading.current_thread() is threading.main_thread()
        previous = {sig: signal.signal(sig, self._on_signal) for sig in STOP_SIGNALS} if main else {}
        forwarder = threading.Thread(target=self._forward, daemon=True)
        try:
            self._proc = subprocess.Popen(
                cmd,
                env={**env, JOB_TOKEN: self.token},
                stderr=subprocess.PIPE,
                text=True,
                errors="replace",
                start_new_session=True,  # a terminal's Ctrl-C reaches `moeyard` alone, which forwards it once
            )
            reader = threading.Thread(target=lambda: [output.feed(line) for line in self._proc.stderr], daemon=True)
            reader.start()
            forwarder.start()
            status = self._proc.wait()
            self._kill_job()  # e.g. a rank's own children, or ranks its launcher left behind
            reader.join(timeout=10)
            return status
        finally:
            self._done.set()
            if self._proc is not None and self._proc.poll() is None:
                send(self._proc.pid, signal.SIGKILL, group=True)
                self._proc.wait()
                self._kill_job()
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def _on_signal(self, signum: int, frame) -> None:
        if self.signum is None:
            self.signum = signum
            self._deadline = time.monotonic() + self.grace_s
        else:  # asked twice: stop waiting for the ranks to save
            self._deadline = time.monotonic()

    def _forward(self) -> None:
        """Signals each rank once; kills the job past the deadline. Runs until the launcher program ends."""
        while not self._done.wait(POLL_S):
            if self.signum is None or self._proc is None:
                continue
            if time.monotonic() >= self._deadline:
                send(self._proc.pid, signal.SIGKILL, group=True)
                self._kill_job()
                continue
            ranks = [pid for pid, is_rank in job_processes(self.token).items() if is_rank]
            if not ranks and not self._signalled:  # no rank yet (e.g. agents still meeting): stop the launcher
                send(self._proc.pid, self.signum, group=True)
                self._signalled.add(self._proc.pid)
            for pid in set(ranks) - self._signalled:
                send(pid, self.signum)
                self._signalled.add(pid)

    def _kill_job(self) -> None:
        for pid in job_processes(self.token):
            send(pid, signal.SIGKILL)
