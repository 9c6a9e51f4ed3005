"""One record for every check the tool reports: preflight, verification and validation."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

OK = "ok"
WARNING = "warning"
FAIL = "fail"
INFO = "info"


@dataclass(frozen=True)
class Check:
    """A named check with its verdict (ok, warning, fail or info) and what it found."""

    name: str
    status: str
    detail: str
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def of(cls, name: str, ok: bool, detail: str, **extra: Any) -> Check:
        return cls(name, OK if ok else FAIL, detail, extra)

    @property
    def ok(self) -> bool:
        return self.status != FAIL

    def to_dict(self) -> dict[str, Any]:
        # Both spellings: "check"/"ok" (verify, validate) and "name"/"status" (status) are
        # read by the action's job summary and by scripts written against either.
        return {
            "check": self.name,
            "name": self.name,
            "ok": self.ok,
            "status": self.status,
            "detail": self.detail,
            **self.extra,
        }


def failures(checks: list[Check]) -> list[Check]:
    return [c for c in checks if not c.ok]


def summary(checks: list[Check]) -> str:
    """The failed checks on one line."""
    return "; ".join(f"{c.name}: {c.detail}" for c in failures(checks))
