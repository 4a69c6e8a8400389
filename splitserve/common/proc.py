"""Child processes that cannot outlive the process that started them, and their restarts.

`owned(argv)` returns argv wrapped so that it runs as `python -m splitserve.common.proc PARENT_PID
-- argv...`: that small step asks Linux to SIGKILL the process when its parent dies
(PR_SET_PDEATHSIG, which survives the exec) and then execs argv itself, so the process keeps its
pid and its command line. The kernel sends the signal even when the parent was SIGKILLed or
OOM-killed, when no code of the parent runs any more.

Why SIGKILL and not SIGTERM: the signal comes exactly when nobody is left to escalate. A service
that hangs in its SIGTERM handler (a wedged engine thread, a drain waiting on a Redis that died in
the same instant) would then live on forever, holding its ports and cores. A drain could not
deliver anything either: the gateway's clients lose their replies with the launcher's cluster,
and every service already rides out a peer's SIGKILL (the scheduler re-reads its pending stream
entries, workers re-register). The orderly stop, SIGTERM and a drain in order, is the launcher's
own job while it lives.

Linux sends the signal when the parent *thread* that forked the child ends, so a parent must start
owned children from a thread that lives as long as it does (the main thread).
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
DEATH_SIGNAL = signal.SIGKILL


def die_with_parent(parent_pid: int, signum: int = DEATH_SIGNAL) -> None:
    """Have the kernel send signum to this process when its parent dies; exit at once if the parent
    is already gone (it may die between our fork and the prctl: then no signal would ever come)."""
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_PDEATHSIG, int(signum), 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
    if os.getppid() != parent_pid:  # reparented: the parent died before the prctl took effect
        raise SystemExit(f"parent {parent_pid} is gone; not starting")


def owned(argv: Sequence[str]) -> list[str]:
    """argv, run so that it dies with this process (see the module docstring)."""
    return [sys.executable, "-m", "splitserve.common.proc", str(os.getpid()), "--", *argv]


@dataclass(frozen=True)
class RestartPolicy:
    """Exponential restart delays, as a container runtime restarts a crashed container: first_s after
    the first crash, doubling with every crash in a row up to max_s; a process that stayed up for
    reset_after_s counts as healthy again and its next crash starts from first_s."""

    first_s: float = 1.0
    max_s: float = 30.0
    reset_after_s: float = 60.0

    def delay_s(self, crashes_in_a_row: int) -> float:
        """Seconds to wait before the restart that follows the crashes_in_a_row-th crash (from 1)."""
        return min(self.max_s, self.first_s * 2.0 ** max(0, crashes_in_a_row - 1))


@dataclass
class Supervised:
    """A child process that is started again, after a backoff, when it exits on its own."""

    name: str
    launch: Callable[[], subprocess.Popen]  # the same process again: same argv, so same name, cores, ports
    log: Path  # where to look when it exits
    process: subprocess.Popen
    log_start: int = 0  # the log's size when this process started: what follows is its own
    started_at: float = field(default_factory=time.monotonic)
    crashes_in_a_row: int = 0
    restart_at: float | None = None  # time.monotonic() of the restart, while it waits out its backoff

    @property
    def exited(self) -> bool:
        return self.process.poll() is not None

    def tend(self, policy: RestartPolicy, now: float) -> str | None:
        """Notice an exit (and schedule the restart), or restart once the backoff has passed; what
        happened, in words for the operator, or None."""
        if self.restart_at is None and self.exited:
            return self._schedule_restart(policy, now)
        if self.restart_at is not None and now >= self.restart_at:
            self.log_start = log_size(self.log)
            self.process, self.started_at, self.restart_at = self.launch(), now, None
            return f"{self.name} restarted (pid {self.process.pid})"
        return None

    def _schedule_restart(self, policy: RestartPolicy, now: float) -> str:
        if now - self.started_at >= policy.reset_after_s:
            self.crashes_in_a_row = 0
        self.crashes_in_a_row += 1
        delay_s = policy.delay_s(self.crashes_in_a_row)
        self.restart_at = now + delay_s
        return (f"{self.name} {exit_reason(self.process.returncode)}; restarting in {delay_s:g} s "
                f"(crash {self.crashes_in_a_row} in a row); see {self.log}")


def log_size(path: Path) -> int:
    """Bytes in the log at path so far (0 when there is none yet)."""
    try:
        return path.stat().st_size
    except OSError:
        return 0


def exit_reason(returncode: int) -> str:
    """'exited with code 1', 'was killed by SIGKILL'."""
    if returncode < 0:
        return f"was killed by {signal.Signals(-returncode).name}"
    return f"exited with code {returncode}"


def main(argv: Sequence[str]) -> None:
    """`python -m splitserve.common.proc PARENT_PID -- COMMAND...`: die with PARENT_PID, exec COMMAND."""
    parent_pid, separator, *command = argv
    if separator != "--" or not command:
        raise SystemExit("usage: python -m splitserve.common.proc PARENT_PID -- COMMAND [ARG...]")
    die_with_parent(int(parent_pid))
    os.execvp(command[0], command)


if __name__ == "__main__":
    main(sys.argv[1:])
