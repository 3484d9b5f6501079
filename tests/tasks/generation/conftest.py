"""Fixtures for the generator tests: one tiny local generator per session, and servers over it."""

from __future__ import annotations

import pytest

from tasks.generation.local import LocalGenerator


@pytest.fixture(scope="session")
def tiny_generator(tiny_model_dir) -> LocalGenerator:
    """The session's tiny random model as a LocalGenerator (CPU, batches of 4)."""
    generator = LocalGenerator(tiny_model_dir, identity_name="tiny", batch_size=4, device="cpu")
    yield generator
    generator.close()


@pytest.fixture
def serve(tiny_generator):
    """Start OpenAI-compatible servers over the tiny generator; all are stopped after the test."""
    from tasks.generation.server import OpenAICompatServer

    servers = []

    def start(**options) -> OpenAICompatServer:
        server = OpenAICompatServer(tiny_generator, model_name="tiny", **options)
        server.start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()
