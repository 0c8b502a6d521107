"""The one registry of trace counters: how many times each of our jitted programs was traced (each trace is
a compilation). Every module with a compiled program registers its counters here (`counter`), the tests and
the app read them (the module's own dict, or `total` over the registry); nothing else keeps its own."""

from __future__ import annotations

_COUNTERS: dict[str, dict[str, int]] = {}


def counter(owner: str, *programs: str) -> dict[str, int]:
    """The counters of `owner`'s programs (registered once; later calls get the same dict)."""
    return _COUNTERS.setdefault(owner, dict.fromkeys(programs, 0))


def total(*owners: str) -> int:
    """Traces so far of the given owners' programs (all owners when none is named)."""
    return sum(sum(counts.values()) for owner, counts in _COUNTERS.items() if not owners or owner in owners)


def snapshot() -> dict[str, dict[str, int]]:
    """A copy of every counter, by owner."""
    return {owner: dict(counts) for owner, counts in _COUNTERS.items()}
