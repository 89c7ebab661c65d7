"""No credentials in the config (issue 16 item 4): every `storage_options` refuses secret-looking
keys, nested and in any case, and says where credentials go instead; the Store refuses them too,
so job files and manifests (which copy storage options) can never hold one.

    .venv/bin/pytest -q tests/infra/test_credentials.py
"""
from __future__ import annotations

import pytest

from lmfoundry.infra.config import ConfigError, build_config
from lmfoundry.infra.credentials import secret_options
from lmfoundry.infra.store import Store, StoreError


@pytest.mark.parametrize(
    "options, found",
    [
        ({"key": "AKIA", "secret": "s"}, ["key", "secret"]),
        ({"client_kwargs": {"AWS_Secret_Access_Key": "s", "endpoint_url": "http://x"}}, ["client_kwargs.AWS_Secret_Access_Key"]),
        ({"token": "t"}, ["token"]),
        ({"config_kwargs": {"s3": {"Password": "p"}}}, ["config_kwargs.s3.Password"]),
        ({"headers": [{"refresh-token": "r"}]}, ["headers.0.refresh-token"]),
        ({"account_key": "k", "sas_token": "t"}, ["account_key", "sas_token"]),
        ({"endpoint_url": "http://x", "anon": True, "profile": "team", "client_kwargs": {"region_name": "eu-west-1"}, "skip_instance_cache": True}, []),
    ],
)
def test_secret_looking_option_names_are_found_at_any_depth(options, found):
    assert secret_options(options) == found


@pytest.mark.parametrize(
    "override, field",
    [
        ("store.storage_options={client_kwargs: {aws_secret_access_key: hunter2}}", "store.storage_options"),
        ("store.storage_options={KEY: AKIA, Secret: hunter2}", "store.storage_options"),
        ("ingest_warc.storage_options={token: hunter2}", "ingest_warc.storage_options"),
        ("sft_data.sources=[{paths: ['s3://b/x.jsonl'], storage_options: {password: hunter2}}]", "sft_data.sources.0.storage_options"),
    ],
)
def test_the_config_refuses_credentials_and_points_to_the_environment(override, field):
    with pytest.raises(ConfigError) as caught:
        build_config({}, [override])
    message = str(caught.value)
    assert f"{field}: " in message and "look" in message and "like a credential" in message
    assert "AWS_SECRET_ACCESS_KEY" in message and "AWS_PROFILE" in message


def test_options_without_credentials_are_kept():
    cfg = build_config({}, ["store.storage_options={client_kwargs: {endpoint_url: 'http://minio:9000'}, profile: team}"])
    assert cfg.store.storage_options == {"client_kwargs": {"endpoint_url": "http://minio:9000"}, "profile": "team"}


def test_the_store_refuses_credentials_too(tmp_path):
    with pytest.raises(StoreError, match="'client_kwargs.aws_session_token'.*environment"):
        Store(str(tmp_path / "s"), {"client_kwargs": {"aws_session_token": "t"}})


def test_an_s3_store_works_with_credentials_from_the_environment_only(s3_store):
    """The loopback S3 fixture passes no credentials in storage_options: they come from AWS_* variables."""
    assert secret_options(s3_store.storage_options) == []
    s3_store.write_bytes_atomic(s3_store.path("probe.txt"), b"ok")
    assert s3_store.fs.cat_file(s3_store.path("probe.txt")) == b"ok"
