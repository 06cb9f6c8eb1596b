"""Placement for an evacuation: which destination takes which workload (pure logic, no SSH).

Biggest workloads first, each to the destination with the most room left, where room is the
smaller of what the host has free (MemAvailable, less what this placement already put there)
and what its configured capacity still allows (capacity_mb, less the RSS of workloads already
placed on it). A workload that fits nowhere is left unplaced, with the reason.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Item:
    """A workload to place: its name and resident memory (the whole tree's RSS)."""

    name: str
    rss_kb: int


@dataclass
class Bin:
    """A destination: its free memory, its capacity (None: unlimited) and what it holds."""

    name: str
    free_kb: int
    capacity_kb: int | None = None
    used_kb: int = 0  # RSS of workloads already on this host (they count against capacity)
    placed: list[str] = field(default_factory=list)

    def room_kb(self) -> int:
        """How much more RSS this host can take now."""
        room = self.free_kb
        if self.capacity_kb is not None:
            room = min(room, self.capacity_kb - self.used_kb)
        return room


@dataclass
class Placement:
    assigned: dict[str, str] = field(default_factory=dict)  # workload -> destination
    unplaced: dict[str, str] = field(default_factory=dict)  # workload -> why
    bins: list[Bin] = field(default_factory=list)


def place(items: list[Item], bins: list[Bin]) -> Placement:
    """Place items, biggest first, each where the most room is left; ties go by name."""
    result = Placement(bins=bins)
    for item in sorted(items, key=lambda i: (-i.rss_kb, i.name)):
        fits = [b for b in bins if b.room_kb() >= item.rss_kb]
        if not fits:
            result.unplaced[item.name] = _why(item, bins)
            continue
        best = min(fits, key=lambda b: (-b.room_kb(), b.name))
        best.free_kb -= item.rss_kb
        best.used_kb += item.rss_kb
        best.placed.append(item.name)
        result.assigned[item.name] = best.name
    return result


def _why(item: Item, bins: list[Bin]) -> str:
    if not bins:
        return "no destination"
    rooms = ", ".join(f"{b.name} {max(b.room_kb(), 0) // 1024} MiB" for b in bins)
    return f"needs {item.rss_kb // 1024} MiB; no destination has room ({rooms})"


def mem_available_kb(meminfo: str) -> int:
    """MemAvailable from /proc/meminfo's text (0 if it is missing)."""
    for line in meminfo.splitlines():
        key, _, rest = line.partition(":")
        if key.strip() == "MemAvailable":
            parts = rest.split()
            return int(parts[0]) if parts and parts[0].isdigit() else 0
    return 0
