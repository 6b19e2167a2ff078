"""Small value checks for the config sections' ``check()`` methods (``data``, ``models`` and
``trainer`` configs). They raise ``ValueError("<field>: <problem>")``; the config loader prefixes
the section's dotted key (``data.sparse[0].embedding_dim: must be > 0, got -4``) and turns it into
the trainer's ``ConfigError`` (exit 2)."""

from __future__ import annotations


def positive(name: str, value: float | int | None, allow_zero: bool = False) -> None:
    """``value`` > 0 (>= 0 with ``allow_zero``); None passes (an unset optional)."""
    if value is None:
        return
    if value < 0 or (value == 0 and not allow_zero):
        raise ValueError(f"{name}: must be {'>= 0' if allow_zero else '> 0'}, got {value}")


def in_unit_interval(name: str, value: float, include_one: bool = False) -> None:
    """0 <= value < 1 (or <= 1)."""
    if not (0 <= value <= 1 if include_one else 0 <= value < 1):
        raise ValueError(f"{name}: must be in [0, 1{']' if include_one else ')'}, got {value}")
