import pytest


@pytest.fixture(scope="session")
def prefect_server():
    """A real `prefect server start` on loopback (one per test process), see tests/flows/server.py."""
    from tests.flows.server import shared_server

    return shared_server()
