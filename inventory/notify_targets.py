"""Where notices go, as the plan, the CLI and the records may show it: never a credential.

A notice target is an apprise URL (``json://hq.example/notices``) or a reference
``secret:NAME`` to one kept out of sight (a Prefect Secret block NAME, or the 0600 file
``$COUNTEROPS_HOME/secrets/NAME``; resolved only when a notice is sent, tasks/notify.py).
A literal URL that carries a credential (userinfo, or a ``token=``/``key=``/``secret=``/
``password=`` query parameter) is refused wherever it comes in: it would show in the Prefect
flow run's parameters, the run record and every error. Whatever shows a URL shows ``redact(url)``.

Pure python (urllib): the plan model validates with it, without apprise or prefect.
"""

from __future__ import annotations

import re
from urllib.parse import parse_qsl, urlsplit

SECRET_PREFIX = "secret:"
SECRET_NAME = re.compile(r"[a-z0-9][a-z0-9-]{0,62}")
"""A secret's name: lowercase letters, digits and '-' (what a Prefect block name allows), up to 63."""
SECRET_NAME_RULE = "1-63 lowercase letters, digits or '-', starting with a letter or digit"
_CREDENTIAL_PARAMS = ("token", "key", "secret", "password", "passwd", "pass", "pwd")
_HOSTLIKE = re.compile(r"(localhost|\[[0-9a-fA-F:.]+\]|[A-Za-z0-9-]+(\.[A-Za-z0-9-]+)+)")
_ADDRESS_SCHEMES = ("mailto", "mailtos")
"""Schemes where ``user@host`` is an e-mail address, not a login (a password after it still is one)."""
CREDENTIAL_ADVICE = "keep it as a secret: counterops secrets set NAME, then write secret:NAME"


def secret_name(target: str) -> str | None:
    """NAME for ``secret:NAME``, else None (a literal URL)."""
    return target[len(SECRET_PREFIX):] if target.startswith(SECRET_PREFIX) else None


def redact(url: str) -> str:
    """``url`` as anything may show it: ``scheme://host/…`` — no userinfo, no path, no query (where
    apprise services keep tokens). A host that does not look like one (a token in its place, as in
    ``tgram://BOT-TOKEN/…``) is left out too. ``secret:NAME`` is shown as it is (a name)."""
    if secret_name(url) is not None:
        return url
    try:
        parts = urlsplit(url.strip())
        scheme = parts.scheme
    except ValueError:
        return "…"
    try:
        host, port = parts.hostname or "", parts.port
    except ValueError:  # "host:port" that is no port: a token in the host's place
        host, port = "", None
    if not scheme:
        return "…"
    shown = host if host and _HOSTLIKE.fullmatch(host) else ""
    if shown and port:
        shown += f":{port}"
    return f"{scheme}://{shown}/…" if shown else f"{scheme}://…"


def carries_credential(url: str) -> bool:
    """Whether a literal URL holds a credential: a user or password before the host, or a query
    parameter named like one (token, key, secret, password, and names ending so: api_key, access_token)."""
    try:
        parts = urlsplit(url.strip())
        netloc = parts.netloc
        query = parse_qsl(parts.query, keep_blank_values=True)
    except ValueError:
        return True  # unreadable: never shown, never accepted as it is
    if "@" in netloc:
        userinfo = netloc.rsplit("@", 1)[0]
        # mailto://it.br01@bank.example: the address itself (apprise's mailto://user:password@host has a password)
        return not (parts.scheme.lower() in _ADDRESS_SCHEMES and ":" not in userinfo)
    return any(name.lower().lstrip("+-:").endswith(_CREDENTIAL_PARAMS) for name, _ in query)


def target_problem(target: str) -> str | None:
    """Why ``target`` may not be written in a plan or given to --notify (None when it may); the
    message never holds the URL itself, only its redacted form."""
    name = secret_name(target)
    if name is not None:
        # the name is not echoed: a URL pasted after "secret:" must not show either
        return None if SECRET_NAME.fullmatch(name) else f"secret:NAME: the name must be {SECRET_NAME_RULE}"
    if carries_credential(target):
        return f"this URL carries a credential; {CREDENTIAL_ADVICE} (the URL: {redact(target)})"
    return None
