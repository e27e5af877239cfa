"""The outcome of a delivery: one line per instance, and the error it adds up to."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from dicom_node.dimse_status import Verdict
from dicom_node.errors import DeliveryError, PermanentDeliveryError, TransientDeliveryError

DELIVERED = frozenset({Verdict.STORED, Verdict.WARNING, Verdict.DUPLICATE})


@dataclass(frozen=True)
class InstanceOutcome:
    """What happened to one result file at one destination."""

    path: Path
    sop_instance_uid: str
    verdict: Verdict
    """STORED/WARNING: the peer stored it; DUPLICATE: the peer already had it and the copy there
    was checked to be ours; TRANSIENT/PERMANENT: not delivered."""
    status: int | None = None
    """DIMSE status, STOW-RS Failure/Warning Reason, or HTTP status; ``None`` when none came."""
    detail: str = ""
    """Why, in words, without patient data or UIDs."""

    @property
    def delivered(self) -> bool:
        return self.verdict in DELIVERED


@dataclass
class DeliveryReport:
    """All instances of one delivery to one destination."""

    destination: str
    kind: str
    """``stow`` or ``cstore``."""
    outcomes: list[InstanceOutcome] = field(default_factory=list)
    verified: bool = False
    """True when read-back verification (QIDO-RS / C-FIND) found every object, ours."""
    seconds: float = 0.0

    @property
    def delivered(self) -> bool:
        return all(o.delivered for o in self.outcomes)

    def count(self, verdict: Verdict) -> int:
        return sum(1 for o in self.outcomes if o.verdict is verdict)

    def failures(self) -> list[InstanceOutcome]:
        return [o for o in self.outcomes if not o.delivered]

    def error(self, where: str) -> DeliveryError | None:
        """The error these outcomes add up to (``None`` when all were delivered).

        Any permanent failure makes the delivery permanent (a resend cannot fix that instance);
        otherwise any transient failure makes it transient."""
        failed = self.failures()
        if not failed:
            return None
        permanent = [o for o in failed if o.verdict is Verdict.PERMANENT]
        shown = permanent or failed
        # Group by reason: a whole-request failure (401, refused connection) is said once.
        groups: dict[str, list[str]] = {}
        for o in shown:
            groups.setdefault(o.detail, []).append(o.path.name)
        parts = []
        for detail, names in list(groups.items())[:4]:
            listed = ", ".join(names[:3]) + (
                f" and {len(names) - 3} more" if len(names) > 3 else ""
            )
            parts.append(f"{detail} ({listed})")
        if len(groups) > 4:
            parts.append(f"and {len(groups) - 4} other reason(s)")
        message = (
            f"{where}: {len(failed)} of {len(self.outcomes)} object(s) not delivered: "
            + "; ".join(parts)
        )
        status = shown[0].status
        cls = PermanentDeliveryError if permanent else TransientDeliveryError
        err: DeliveryError = cls(message, status)
        # For in-process callers (the pipeline, tests); DeliveryError pickles without it.
        setattr(err, "report", self)  # noqa: B010
        return err
