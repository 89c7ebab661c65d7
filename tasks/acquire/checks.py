"""Input checks shared by the acquire stages (ingest, ingest_warc): binary content, empty output.

    looks_binary(b"\\x00" * 4096)       # True: skipped and counted as `binary`
    empty_output_warning("ingest", 2, 0, {"empty_file": 2})   # a warning for the log and the stats
"""
from __future__ import annotations

import codecs

SAMPLE_BYTES = 8192
# C0 controls that text does not use (tab, newline, form feed, carriage return and escape are text)
CONTROL_BYTES = bytes(c for c in range(32) if c not in (8, 9, 10, 12, 13, 27)) + b"\x7f"
MAX_CONTROL_SHARE = 0.05
UNICODE_BOMS = (codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)  # UTF-16/32 text is full of NUL bytes, and says so


def looks_binary(data: bytes | str) -> bool:
    """Whether the start of `data` is not text: a NUL, or more than 5 % control characters.

    Images, archives, executables and random bytes all hold NULs within a few KiB (random bytes:
    one in 256); text never does, unless it is UTF-16/32 with its byte-order mark."""
    if isinstance(data, str):
        data = data[:SAMPLE_BYTES].encode("utf-8", "surrogatepass")
    head = data[:SAMPLE_BYTES]
    if not head or head.startswith(UNICODE_BOMS):
        return False
    if b"\x00" in head:
        return True
    controls = len(head) - len(head.translate(None, CONTROL_BYTES))
    return controls > MAX_CONTROL_SHARE * len(head)


def empty_output_warning(stage: str, inputs: int, outputs: int, skipped: dict[str, int]) -> list[str]:
    """The warning a stage gives when it commits no documents at all, or [] when it has some.

    An empty output is committed (re-running would give the same), but it is almost always a
    mistake upstream: no files configured, empty files, or every record skipped."""
    if outputs:
        return []
    if inputs == 0:
        return [f"{stage}: no input files; the output is empty (check the configured paths)"]
    reasons = ", ".join(f"{k}={v}" for k, v in sorted(skipped.items())) or "none recorded"
    return [f"{stage}: {inputs} input file(s) gave no documents; the output is empty (skipped: {reasons})"]
