"""A real `prefect server start` on 127.0.0.1 for the tests that need one (schedules, deploy, UI).

One server per test process (started on first use, stopped at exit); tests talk to it with
an explicit client and start `lmf serve` subprocesses pointed at it, so the in-process
Prefect settings of other tests are untouched.
"""
from __future__ import annotations

import atexit
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from tests.conftest import free_port

VENV_BIN = Path(sys.executable).parent
REPO = Path(__file__).resolve().parents[2]


class PrefectServer:
    def __init__(self) -> None:
        self.home = Path(tempfile.mkdtemp(prefix="lmf-test-server-"))
        self.port = free_port()
        self.ui_url = f"http://127.0.0.1:{self.port}"
        self.api_url = f"{self.ui_url}/api"
        self.log_path = self.home / "server.log"
        env = {
            **self.env(),
            "PREFECT_SERVER_API_HOST": "127.0.0.1",
            "PREFECT_SERVER_API_PORT": str(self.port),
            "PREFECT_SERVER_UI_SHOW_PROMOTIONAL_CONTENT": "false",
            # schedules in tests are seconds apart: look for due runs every second
            "PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS": "1",
        }
        self.process = subprocess.Popen(
            [str(VENV_BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(self.port)],
            env=env,
            stdout=self.log_path.open("wb"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self._wait_healthy(timeout=180)

    def env(self, **extra: str) -> dict[str, str]:
        """Environment for a subprocess that should talk to this server."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
        env.update(
            PREFECT_HOME=str(self.home),
            PREFECT_API_URL=self.api_url,
            PREFECT_SERVER_ANALYTICS_ENABLED="false",
            PREFECT_LOGGING_EXTRA_LOGGERS="lmfoundry",
            PREFECT_RUNNER_POLL_FREQUENCY="2",
            DS_ACCELERATOR="cpu",
        )
        env.update(extra)
        return env

    def client(self):
        from prefect.client.orchestration import SyncPrefectClient

        return SyncPrefectClient(self.api_url)

    def _wait_healthy(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"prefect server exited: {self.log_path.read_text()[-3000:]}")
            try:
                if httpx.get(f"{self.api_url}/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise RuntimeError(f"prefect server not healthy after {timeout}s: {self.log_path.read_text()[-3000:]}")

    def stop(self) -> None:
        stop_process(self.process)


def stop_process(process: subprocess.Popen, grace: float = 15) -> None:
    """SIGINT the process group we started (serve pauses schedules on it), then SIGKILL."""
    if process.poll() is not None:
        return
    os.killpg(process.pid, signal.SIGINT)
    try:
        process.wait(grace)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


_server: PrefectServer | None = None


def shared_server() -> PrefectServer:
    global _server
    if _server is None:
        _server = PrefectServer()
        atexit.register(_server.stop)
    return _server


def start_serve(server: PrefectServer, args: list[str], log_path: Path, **env: str) -> subprocess.Popen:
    """`lmf serve ARGS` in its own process group, talking to `server`."""
    return subprocess.Popen(
        [str(VENV_BIN / "lmf"), "serve", *args],
        cwd=REPO,
        env=server.env(**env),
        stdout=log_path.open("wb"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def wait_for(predicate, timeout: float, interval: float = 1.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")
