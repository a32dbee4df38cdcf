"""One live `streamlit run streamlit_app.py` for the browser tests and the benches.

    with LiveServer(log_path=..., flags=[...], env={...}) as server:
        page.goto(server.base + "/mla")      # server.port, server.pid, server.proc, server.alive

Starts the app on a free 127.0.0.1 port (headless, no file watcher, no usage stats, plus the caller's extra
server flags and environment variables), waits until `/_stcore/health` answers "ok" (RuntimeError naming the
log if the process exits or `start_timeout` passes first), and on exit terminates it (kill if it ignores that)
and closes the log.

Why here: the browser tests (`from live_server import LiveServer`, tests/ is on sys.path under pytest like
tests/apptest_helpers.py) and the bench scripts (`from tests.live_server import LiveServer`, after the repository
root they already put on sys.path) share it without a new top-level folder beside the documented layout, and
the helper stays with the tests whose contract it is. It needs only the standard library.
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Sequence

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now (the OS picks it)."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


class LiveServer:
    """Context manager around one `streamlit run` process; see the module docstring.

    log_path: where the server's stdout and stderr go (None: discarded). flags: extra `streamlit run` options,
    e.g. ["--server.disconnectedSessionTTL", "5"]. env: variables added to this process's environment.
    """

    def __init__(self, *, log_path: Path | str | None = None, flags: Sequence[str] = (), env: dict | None = None,
                 start_timeout: float = 120.0):
        self.log_path = None if log_path is None else Path(log_path)
        self.flags = [str(f) for f in flags]
        self.env = dict(os.environ, **(env or {}))
        self.start_timeout = float(start_timeout)
        self.port: int | None = None
        self.base = ""
        self.proc: subprocess.Popen | None = None
        self._log = None

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def __enter__(self) -> "LiveServer":
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        if self.log_path is not None:
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            self._log = open(self.log_path, "w")
        out = self._log if self._log is not None else subprocess.DEVNULL
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "streamlit", "run", "streamlit_app.py", "--server.headless", "true",
             "--server.port", str(self.port), "--server.address", "127.0.0.1", "--server.fileWatcherType", "none",
             "--browser.gatherUsageStats", "false", *self.flags],
            cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, env=self.env)
        try:
            self._wait_healthy()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def _wait_healthy(self) -> None:
        t0 = time.monotonic()
        while True:
            try:
                if urllib.request.urlopen(self.base + "/_stcore/health", timeout=2).read() == b"ok":
                    return
            except OSError:
                pass
            if self.proc.poll() is not None or time.monotonic() - t0 > self.start_timeout:
                why = (f"exited with code {self.proc.returncode}" if self.proc.poll() is not None
                       else f"not healthy after {self.start_timeout:.0f} s")
                where = f"see {self.log_path}" if self.log_path is not None else "its output was discarded"
                raise RuntimeError(f"streamlit did not start ({why}); {where}")
            time.sleep(0.3)

    def stop(self) -> None:
        """Terminate the server (kill after 15 s) and close the log; safe to call twice."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        if self._log is not None:
            self._log.close()
            self._log = None
