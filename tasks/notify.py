"""Notices to branches and head office, through apprise (any of its ~100 services by URL).

A notice that cannot be delivered is logged and reported back, never silently
dropped; whether that stops the procedure is the flow's decision (the
advance notice does, later notices do not).

Targets are apprise URLs without credentials, or ``secret:NAME`` (tasks/secrets.py), resolved
only here, at send time. Every message that names a target names ``redact(target)``:
``scheme://host/…``, never userinfo, path or query (inventory/notify_targets.py).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import apprise

from inventory.notify_targets import CREDENTIAL_ADVICE, redact, secret_name, target_problem

__all__ = ["Notice", "NotifyError", "redact", "send_notice", "target_problems"]

log = logging.getLogger("counterops.notify")


@dataclass(frozen=True)
class Notice:
    title: str
    body: str
    kind: str = "info"  # info | success | warning | failure


_TYPES = {
    "info": apprise.NotifyType.INFO,
    "success": apprise.NotifyType.SUCCESS,
    "warning": apprise.NotifyType.WARNING,
    "failure": apprise.NotifyType.FAILURE,
}


class NotifyError(RuntimeError):
    """A notice could not be delivered to one or more targets (named redacted)."""


def _apprise_hides_something(url: str) -> bool:
    """Whether apprise itself counts a part of ``url`` as private (a token in the path, say)."""
    plugin = apprise.Apprise.instantiate(url)
    return plugin is not None and plugin.url(privacy=True) != plugin.url(privacy=False)


def target_problems(targets: list[str], field: str = "notify") -> list[str]:
    """One line per target that may not be used, ``field[i]: why``, naming targets only redacted:
    a credential in a literal URL (keep it as a secret), a bad secret name, a URL apprise cannot use.
    Secrets are not resolved here (only when a notice is sent)."""
    problems = []
    for i, target in enumerate(targets):
        problem = target_problem(target)
        if problem is None and secret_name(target) is None:
            if apprise.Apprise.instantiate(target) is None:
                problem = (f"apprise cannot send to {redact(target)}; see https://github.com/caronc/apprise/wiki "
                           "for URL formats")
            elif _apprise_hides_something(target):
                problem = f"this URL carries a credential; {CREDENTIAL_ADVICE} (the URL: {redact(target)})"
        if problem:
            problems.append(f"{field}[{i}]: {problem}")
    return problems


def _resolved(target: str) -> str:
    name = secret_name(target)
    if name is None:
        return target
    from tasks.secrets import resolve

    return resolve(name)


def send_notice(urls: list[str], notice: Notice) -> None:
    """Deliver ``notice`` to every target; raise NotifyError naming the ones that failed (redacted)."""
    if not urls:
        return
    failed = []
    for target in urls:  # one Apprise object per URL, so a failure names its target
        try:
            url = _resolved(target)
        except Exception as e:  # a missing or exposed secret: named, never its value
            failed.append(f"{redact(target)} ({e})")
            continue
        a = apprise.Apprise()
        try:
            sent = a.add(url) and a.notify(title=notice.title, body=notice.body, notify_type=_TYPES[notice.kind])
        except Exception as e:  # apprise's own errors may quote the URL: only the kind of error is kept
            log.warning("notice to %s failed: %s", redact(target), type(e).__name__)
            sent = False
        if not sent:
            failed.append(redact(target))
    if failed:
        raise NotifyError(f"notice {notice.title!r} not delivered to: {', '.join(failed)}")
