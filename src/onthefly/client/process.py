"""`ProcessDashboard`: start a training script over stdio and steer it on its stdin/stdout.

The script runs with `ONTHEFLY_TRANSPORT=stdio`; its stderr lines become `log` events with
`level: "stderr"`. The engine sees the pipes as one `Link`, like a TCP connection.
"""

from __future__ import annotations

import logging
import os
import subprocess
import threading
import time
from typing import BinaryIO

from .base import DashboardBase
from .link import Link
from .wire import MAX_LINE_BYTES

__all__ = ["ProcessDashboard"]

logger = logging.getLogger(__name__)


class ProcessDashboard(DashboardBase):
    """Start a training script with `ONTHEFLY_TRANSPORT=stdio` and steer it over its stdin/stdout.

    `env` holds extra environment variables, laid over the current environment. The script's
    stderr lines are delivered as `log` events with `level: "stderr"` and kept in `stderr_lines`.
    `close()` closes the script's stdin, then terminates it if it has not exited after
    `terminate_timeout` seconds.
    """

    def __init__(
        self,
        argv: list[str],
        env: dict[str, str] | None = None,
        *,
        cwd: str | os.PathLike[str] | None = None,
        keep_events: int | None = None,
        terminate_timeout: float = 5.0,
    ) -> None:
        super().__init__(keep_events=keep_events)
        if isinstance(argv, (str, bytes)) or not isinstance(argv, (list, tuple)) or not argv:
            raise ValueError(f"argv must be a non-empty list of strings, got {argv!r}")
        bad = [a for a in argv if not isinstance(a, (str, os.PathLike))]
        if bad:
            raise TypeError(f"argv entries must be strings, got {bad[0]!r}")
        if env is not None:
            if not isinstance(env, dict):
                raise TypeError(f"env must be a dict of strings, got {type(env).__name__}")
            for key, value in env.items():
                if not isinstance(key, str) or not isinstance(value, str):
                    raise TypeError(f"env entries must be str -> str, got {key!r}: {value!r}")
        self.argv = [os.fspath(a) for a in argv]
        self.env = dict(env) if env else {}
        self.cwd = cwd
        self.terminate_timeout = terminate_timeout
        self.stderr_lines: list[str] = []
        self._proc: subprocess.Popen[bytes] | None = None
        self._stderr_thread: threading.Thread | None = None

    def start(self) -> ProcessDashboard:
        """Start the script and begin reading its protocol stream; returns self."""
        if self._started:
            raise RuntimeError("ProcessDashboard.start() was already called")
        env = dict(os.environ)
        env.update(self.env)
        env["ONTHEFLY_TRANSPORT"] = "stdio"
        env.setdefault("PYTHONUNBUFFERED", "1")
        proc = subprocess.Popen(
            self.argv,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env,
            cwd=self.cwd,
        )
        self._proc = proc
        self._started = True
        assert proc.stdin is not None and proc.stdout is not None and proc.stderr is not None
        stdin, stdout = proc.stdin, proc.stdout

        def write(data: bytes) -> None:
            stdin.write(data)
            stdin.flush()

        def shutdown() -> None:
            try:
                stdin.close()
            except OSError as exc:  # the child already closed its end
                logger.debug("closing the trainer's stdin: %s", exc)

        self._stderr_thread = threading.Thread(
            target=self._stderr_loop, args=(proc.stderr,), name="onthefly-dashboard-stderr", daemon=True
        )
        self._stderr_thread.start()
        self._attach(Link(stdout, write, shutdown, stdout.close, f"pid {proc.pid}"))
        return self

    def close_input(self) -> None:
        """Close the script's stdin: no more commands will come, so it may stop serving and exit.

        Events keep arriving until the script exits; requests fail with TrainerDisconnected.
        """
        with self._lock:
            link = self._link
        if link is not None:
            link.shutdown()

    @property
    def pid(self) -> int | None:
        """The script's process id, once started."""
        return self._proc.pid if self._proc is not None else None

    @property
    def returncode(self) -> int | None:
        """The script's exit status, or None while it runs (negative: killed by that signal)."""
        return self._proc.poll() if self._proc is not None else None

    def wait(self, timeout: float | None = None) -> int:
        """Wait until the script has exited and all its output has been delivered; its exit code."""
        if self._proc is None:
            raise RuntimeError("ProcessDashboard.wait() before start()")
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while not self._ended:
                if deadline is None:
                    self._cond.wait()
                else:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        raise TimeoutError(f"the script {self.argv[0]!r} was still running after {timeout} s")
                    self._cond.wait(remaining)
        code = self._proc.poll()
        assert code is not None
        return code

    def _end_reason(self) -> str:
        code = self.returncode
        return f"the script exited with code {code}" if code is not None else "the dashboard is closed"

    def _stderr_loop(self, stream: BinaryIO) -> None:
        try:
            while True:
                line = stream.readline(MAX_LINE_BYTES)
                if not line:
                    return
                text = line.decode("utf-8", errors="replace").rstrip("\r\n")
                with self._lock:
                    self.stderr_lines.append(text)
                    self._deliver_locked({"type": "log", "level": "stderr", "text": text, "ts": time.time()})
        except (OSError, ValueError) as exc:  # stream closed under us by close()
            logger.debug("stderr of %s ended: %s", self.argv[0], exc)
        finally:
            stream.close()

    def _after_link_closed(self, link: Link) -> None:
        proc = self._proc
        assert proc is not None
        if self._stderr_thread is not None:
            self._stderr_thread.join(timeout=self.terminate_timeout)
        if not self._closed:
            # The protocol stream ended; the script is finishing. Wait for it (close() kills it if need be).
            proc.wait()
        with self._lock:
            if proc.poll() is not None or self._closed:
                self._ended = True
            self._cond.notify_all()

    def _close_transport(self) -> None:
        proc = self._proc
        if proc is None:
            return
        if proc.stdin is not None and not proc.stdin.closed:
            try:
                proc.stdin.close()
            except OSError as exc:
                logger.debug("closing the trainer's stdin: %s", exc)
        try:
            proc.wait(timeout=self.terminate_timeout)
        except subprocess.TimeoutExpired:
            logger.warning("script %s did not exit after stdin closed; terminating it", self.argv[0])
            proc.terminate()
            try:
                proc.wait(timeout=self.terminate_timeout)
            except subprocess.TimeoutExpired:
                logger.warning("script %s ignored SIGTERM; killing it", self.argv[0])
                proc.kill()
                proc.wait()
        if self._stderr_thread is not None and self._stderr_thread is not threading.current_thread():
            self._stderr_thread.join(timeout=5.0)

    def __repr__(self) -> str:
        return f"ProcessDashboard({self.argv!r}, pid={self.pid}, returncode={self.returncode})"

