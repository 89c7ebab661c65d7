"""Shared fixtures: a local store, a real S3 API server on loopback, a Prefect test harness."""
from __future__ import annotations

import os
import socket
import tempfile
import uuid

_HOME = tempfile.mkdtemp(prefix="lmf-test-prefect-")
# before prefect is imported anywhere: private home, no telemetry, our logs in run logs
os.environ.setdefault("PREFECT_HOME", _HOME)
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "lmfoundry")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
os.environ.setdefault("PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW", "ignore")

import pytest  # noqa: E402

from lmfoundry.infra.store import Store  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def store(tmp_path) -> Store:
    return Store(str(tmp_path / "store"))


@pytest.fixture(scope="session")
def s3_endpoint():
    """A real S3 API server (moto) on 127.0.0.1; s3fs talks HTTP to it."""
    from moto.server import ThreadedMotoServer

    os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
    os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    yield f"http://127.0.0.1:{port}"
    server.stop()


@pytest.fixture
def s3_store(s3_endpoint) -> Store:
    """A Store in a fresh bucket on the loopback S3 server."""
    import boto3

    bucket = f"lmf-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1").create_bucket(Bucket=bucket)
    options = {"client_kwargs": {"endpoint_url": s3_endpoint}, "skip_instance_cache": True}
    return Store(f"s3://{bucket}/lmf", storage_options=options)


@pytest.fixture(scope="session")
def prefect_harness():
    """One Prefect test server for the whole session (it takes ~10 s to start)."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(scope="session")
def prefect_api_url(prefect_harness) -> str:
    """The harness server's API URL, for `lmf` subprocesses (saves a temporary server per call)."""
    import prefect.settings

    return prefect.settings.PREFECT_API_URL.value()
