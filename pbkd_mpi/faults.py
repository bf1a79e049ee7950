"""Fault injection for tests, through the PBKD_FAULT environment variable.

Forms, several separated by commas:
  raise:BLOCK   the task of block BLOCK raises an exception on its worker
  nan:BLOCK     the task of block BLOCK trains on data with a NaN, so its loss is NaN
Not for production use: it exists so that the failure paths are tested for real.
"""

from __future__ import annotations

import os

from .errors import UserError

KINDS = ("raise", "nan")


class InjectedFault(RuntimeError):
    pass


def parse(text: str) -> list[tuple[str, str]]:
    faults = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        kind, _, target = item.partition(":")
        if kind not in KINDS or not target:
            raise UserError(
                f"PBKD_FAULT expects items like {', '.join(k + ':BLOCK' for k in KINDS)}, "
                f"received {item!r}."
            )
        faults.append((kind, target))
    return faults


def active(kind: str, target: str) -> bool:
    return (kind, target) in parse(os.environ.get("PBKD_FAULT", ""))
