"""What counts as patient data in text, and how to keep it out of logs, audit lines and reasons.

Our own messages are patient-free by contract (``dicom_node.errors``): they name internal keys,
never dataset values. Text made by other libraries is not: pydicom, highdicom and numpy put the
offending value into their exception messages and warnings (``invalid literal for int() with
base 10: 'ZQCA'`` from a malformed birth date), pynetdicom dumps datasets at debug level, and
SQLAlchemy logs query parameters. So:

* an exception is described by its type, plus its message only when it is one of ours
  (:func:`describe_exception`);
* a traceback keeps its frames (file, line, function and source line: code, not data) and
  withholds the message of every exception that is not ours (:func:`safe_traceback`);
* free text from a library has every quoted or bracketed part replaced (:func:`scrub_text`),
  which is where libraries put values (``'...'``, ``"..."``, ``[...]``, ``<...>``).
"""

from __future__ import annotations

import re
import traceback
from types import TracebackType

from dicom_node.errors import DicomNodeError

WITHHELD = "<withheld>"

_QUOTED = re.compile(
    # 'value' (Python reprs, pydicom) and b'bytes', but not the apostrophe of "Patient's"
    r"""(?<![\w'])b?'(?:[^'\\\n]|\\.)*'"""
    r'''|(?<![\w"])b?"(?:[^"\\\n]|\\.)*"'''  # "value"
    r"|\[[^\[\]\n]*\]"  # [value] (pynetdicom and DCMTK style dumps)
    r"|<[^<>\n]*>"  # <value> (dciodvfy)
)
# A DICOM UID (PS3.5 9.1) or a long digit run (IDs, dates) outside quotes still identifies a
# study or a patient: numbers of five digits or more, and dotted digit runs, are withheld too,
# and so are single byte codes ("Character invalid for this VR = 'Q' (0x51)").
_UID_OR_NUMBER = re.compile(r"\b\d+(?:\.\d+){2,}\b|\b\d{5,}\b|\b0x[0-9A-Fa-f]{1,2}\b")

ExcInfo = tuple[type[BaseException], BaseException, TracebackType | None]


def is_ours(exc: BaseException) -> bool:
    """True for the node's own errors, whose messages never carry patient data."""
    return isinstance(exc, DicomNodeError)


def describe_exception(exc: BaseException) -> str:
    """``ValueError`` for a library's exception, ``JobError: <its message>`` for ours."""
    name = type(exc).__name__
    if is_ours(exc):
        text = " ".join(str(exc).split())
        return f"{name}: {text}" if text else name
    return name


_CONTROL = re.compile(r"[\x00-\x1f\x7f]+")


def reason_text(text: str | None, limit: int = 1000) -> str | None:
    """A recorded reason as one bounded line (control characters cannot split or forge it)."""
    if text is None:
        return None
    return _CONTROL.sub(" ", text).strip()[:limit]


def scrub_text(text: str) -> str:
    """``text`` with every quoted or bracketed part, UID and long number replaced by a marker."""
    return _UID_OR_NUMBER.sub(WITHHELD, _QUOTED.sub(WITHHELD, text))


def safe_traceback(exc_info: ExcInfo | tuple[None, None, None]) -> str:
    """A traceback (with its chained causes) whose library exception messages are withheld."""
    _, exc, _ = exc_info
    if exc is None:
        return ""
    lines: list[str] = []
    seen: set[int] = set()
    chain: list[tuple[BaseException, str | None]] = []
    current: BaseException | None = exc
    link: str | None = None
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        chain.append((current, link))
        if current.__cause__ is not None:
            current, link = (
                current.__cause__,
                "The above exception was the direct cause of the following exception:",
            )
        elif current.__context__ is not None and not current.__suppress_context__:
            current, link = (
                current.__context__,
                "During handling of the above exception, another exception occurred:",
            )
        else:
            current = None
    for item, link_text in reversed(chain):
        if item.__traceback__ is not None:
            lines.append("Traceback (most recent call last):")
            lines.extend(
                part.rstrip("\n")
                for part in traceback.format_list(traceback.extract_tb(item.__traceback__))
            )
        lines.append(
            describe_exception(item) if is_ours(item) else f"{type(item).__name__}: {WITHHELD}"
        )
        if link_text is not None:
            lines.append("")
            lines.append(link_text)
            lines.append("")
    return "\n".join(lines)
