"""Fixtures for remote registry roots: a real S3-compatible server (moto) on 127.0.0.1, and memory://.

Each test gets its own bucket (or memory name) and its own empty download cache, through
ALIGNFLOW_HOME and ALIGNFLOW_CACHE, exactly as a deployment would configure them.
"""

from __future__ import annotations

import logging
import uuid
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def s3_endpoint() -> str:
    """The URL of a moto S3 server for the whole session."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture
def s3_env(s3_endpoint, monkeypatch) -> str:
    """AWS settings pointing at the local server (dummy credentials); returns the endpoint."""
    import s3fs

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_endpoint)
    monkeypatch.delenv("ALIGNFLOW_STORAGE_OPTIONS", raising=False)
    # fsspec reuses file system objects across calls; a test must not get one built for other settings.
    s3fs.S3FileSystem.clear_instance_cache()
    return s3_endpoint


@pytest.fixture
def cache_dir(tmp_path, monkeypatch) -> Path:
    """An empty download cache for this test."""
    path = tmp_path / "cache"
    monkeypatch.setenv("ALIGNFLOW_CACHE", str(path))
    return path


@pytest.fixture
def s3_root(s3_env, cache_dir, monkeypatch) -> str:
    """ALIGNFLOW_HOME = s3://<fresh bucket>/registry on the local server."""
    import s3fs

    bucket = f"alignflow-{uuid.uuid4().hex[:12]}"
    s3fs.S3FileSystem().mkdir(bucket)
    root = f"s3://{bucket}/registry"
    monkeypatch.setenv("ALIGNFLOW_HOME", root)
    return root


@pytest.fixture
def memory_root(cache_dir, monkeypatch) -> str:
    """ALIGNFLOW_HOME = memory://<fresh name>/registry (fsspec's in-process file system)."""
    monkeypatch.delenv("ALIGNFLOW_STORAGE_OPTIONS", raising=False)
    root = f"memory://alignflow-{uuid.uuid4().hex[:12]}/registry"
    monkeypatch.setenv("ALIGNFLOW_HOME", root)
    return root


@pytest.fixture(params=["s3", "memory"])
def remote_root(request) -> str:
    """Each test that takes it runs once against S3 and once against memory://."""
    return request.getfixturevalue(f"{request.param}_root")
