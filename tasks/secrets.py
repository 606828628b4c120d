"""Secrets referred to by name (``secret:NAME``): notice URLs that carry a credential.

Kept as ``$COUNTEROPS_HOME/secrets/NAME`` (the directory 0700, each file 0600; a file that
group/others may read is refused, never used) and/or as a Prefect Secret block NAME, which the
workers of a deployment can read wherever they run. A name is resolved only when it is used
(``resolve``): the value never enters a plan, a flow run's parameters, a record or a log.
Prefect is imported only by the functions that talk to it.
"""

from __future__ import annotations

import os
from pathlib import Path

from inventory.notify_targets import SECRET_NAME, SECRET_NAME_RULE
from inventory.paths import check_private, counterops_home


class SecretError(RuntimeError):
    """A secret could not be stored or found; the message names it, never its value."""


def secrets_dir() -> Path:
    path = counterops_home() / "secrets"
    path.mkdir(mode=0o700, exist_ok=True)
    return check_private(path)


def _checked_name(name: str) -> str:
    if not SECRET_NAME.fullmatch(name):
        raise SecretError(f"NAME: a secret's name must be {SECRET_NAME_RULE}")
    return name


def write_secret(name: str, value: str) -> Path:
    """Keep ``value`` as the file secret ``name`` (0600, replaced atomically); returns its path."""
    value = value.strip()
    if not value:
        raise SecretError(f"{name}: the value is empty; give the URL on standard input")
    directory = secrets_dir()
    path = directory / _checked_name(name)
    tmp = directory / f".{name}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(value + "\n")
    os.chmod(tmp, 0o600)  # an older temporary file kept its mode
    os.replace(tmp, path)
    return path


def file_names() -> list[str]:
    """Names of the secrets kept as files."""
    return sorted(p.name for p in secrets_dir().iterdir() if p.is_file() and SECRET_NAME.fullmatch(p.name))


def read_secret_file(name: str) -> str | None:
    """The file secret ``name``, None when there is none; SecretError when group/others may read it."""
    path = secrets_dir() / _checked_name(name)
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    try:
        check_private(path, st)
    except PermissionError as e:
        raise SecretError(f"secret:{name}: {e}") from None
    return path.read_text(encoding="utf-8").strip() or None


def set_prefect_secret(name: str, value: str) -> None:
    """Keep ``value`` as the Prefect Secret block ``name`` (the Prefect API this process uses)."""
    from prefect.blocks.system import Secret

    Secret(value=value.strip()).save(_checked_name(name), overwrite=True)


def prefect_secret_names() -> list[str]:
    """Names of the Prefect Secret blocks (empty when the API has none or cannot be asked)."""
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        documents = client.read_block_documents(include_secrets=False)
    return sorted(d.name for d in documents if d.name and not d.is_anonymous
                  and (d.block_type_name == "Secret" or (d.block_type is not None and d.block_type.slug == "secret")))


def resolve(name: str) -> str:
    """The value of secret ``name``: the Prefect Secret block ``name`` when the Prefect API has
    one, else the file ``$COUNTEROPS_HOME/secrets/name``; SecretError when neither holds it."""
    _checked_name(name)
    value = _prefect_secret(name)
    if value is None:
        value = read_secret_file(name)
    if value is None:
        raise SecretError(f"secret:{name}: no Prefect Secret block {name!r} and no file {secrets_dir() / name}; "
                          f"store it with: counterops secrets set {name}")
    return value


def _prefect_secret(name: str) -> str | None:
    if not os.environ.get("PREFECT_API_URL"):
        return None  # no Prefect API in this process: files only
    try:
        from prefect.blocks.system import Secret

        value = Secret.load(name).get()
    except Exception:  # no such block (ValueError), or the API cannot be asked: the file is the fallback
        return None
    return str(value).strip() if value else None
