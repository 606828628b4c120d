"""Notices to branches and head office, through apprise (any of its ~100 services by URL).

A notice that cannot be delivered is logged and reported back, never silently
dropped; whether that stops the procedure is the flow's decision (the
advance notice does, later notices do not).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import apprise

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
    """A notice could not be delivered to one or more targets."""


def check_targets(urls: list[str]) -> list[str]:
    """The URLs apprise cannot use (unknown scheme, malformed), for plan validation."""
    return [u for u in urls if apprise.Apprise.instantiate(u) is None]


def send_notice(urls: list[str], notice: Notice) -> None:
    """Deliver ``notice`` to every URL; raise NotifyError naming the ones that failed."""
    if not urls:
        return
    failed = []
    for url in urls:  # one Apprise object per URL, so a failure names its target
        a = apprise.Apprise()
        if not a.add(url) or not a.notify(title=notice.title, body=notice.body, notify_type=_TYPES[notice.kind]):
            failed.append(url)
    if failed:
        raise NotifyError(f"notice {notice.title!r} not delivered to: {', '.join(failed)}")
