"""Assertions shared by test modules (imported as ``from checks import ...``: pytest puts
tests/ on sys.path)."""

from __future__ import annotations


def one_line_error(code: int, err: str, *needles: str) -> str:
    """Exit 2, exactly one non-empty stderr line, starting `nasrisk: error:`, naming each
    needle; no traceback. Returns the line."""
    assert code == 2, err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("nasrisk: error: "), lines[0]
    assert "Traceback" not in err
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]
