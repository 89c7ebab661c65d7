"""Keep credentials out of the config: it is a flow parameter (stored in Prefect's database in
plain text) and it is written into job files and manifests.

`storage_options` fields accept fsspec options such as ``endpoint_url``, ``anon``, ``profile``
or ``client_kwargs.region_name``; an option whose name looks like a secret (``key``,
``secret``, ``token``, ``password``, ``aws_secret_access_key``, ... at any depth, any case) is
refused with a message that says where credentials go instead:

    from lmfoundry.infra.credentials import secret_options
    secret_options({"client_kwargs": {"aws_secret_access_key": "x"}})  # ['client_kwargs.aws_secret_access_key']
"""
from __future__ import annotations

from typing import Annotated, Any

from pydantic import AfterValidator

# names that are a secret on their own (fsspec/s3fs: key, secret, token; gcsfs: token; adlfs:
# account_key, sas_token, connection_string, client_secret; webdav/ftp/ssh: password)
SECRET_NAMES = {
    "key", "secret", "token", "password", "passwd", "pass", "access_key", "secret_key", "access_key_id",
    "secret_access_key", "aws_access_key_id", "aws_secret_access_key", "aws_session_token", "session_token",
    "account_key", "sas_token", "client_secret", "connection_string", "credentials", "private_key", "api_key",
    "apikey", "auth", "authorization", "bearer",
}
# parts that make any name a secret (refresh_token, db_password, gcp_credentials_json, ...)
SECRET_PARTS = ("secret", "password", "passwd", "token", "credential", "private_key", "api_key", "apikey", "sas_")

WHERE_INSTEAD = (
    "credentials never go in the config (it is stored in Prefect's database and in job and manifest files): "
    "remove it and give them through the environment of the process that runs the stages "
    "(AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / AWS_SESSION_TOKEN, or AWS_PROFILE or the option "
    "`profile: NAME` with ~/.aws/credentials; on a Prefect worker, the work pool's environment)"
)


def looks_secret(name: str) -> bool:
    plain = str(name).lower().replace("-", "_")
    return plain in SECRET_NAMES or any(part in plain for part in SECRET_PARTS)


def secret_options(options: Any, prefix: str = "") -> list[str]:
    """Dotted paths of the secret-looking keys in `options` (nested dicts and lists too)."""
    found: list[str] = []
    if isinstance(options, dict):
        for name, value in options.items():
            path = f"{prefix}{name}"
            if looks_secret(name):
                found.append(path)
            found += secret_options(value, path + ".")
    elif isinstance(options, (list, tuple)):
        for i, value in enumerate(options):
            found += secret_options(value, f"{prefix}{i}.")
    return found


def refuse_secrets(options: dict[str, Any]) -> dict[str, Any]:
    """The pydantic check of a `storage_options` field (its message names the offending keys)."""
    found = secret_options(options)
    if found:
        raise ValueError(f"{', '.join(repr(p) for p in found)} look{'s' if len(found) == 1 else ''} like a credential; {WHERE_INSTEAD}")
    return options


# the type of every `storage_options` field in the config tree
StorageOptions = Annotated[dict[str, Any], AfterValidator(refuse_secrets)]
