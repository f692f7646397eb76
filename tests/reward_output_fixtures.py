"""Reward functions for the out-of-range and output tests; workers import them as `reward_output_fixtures:...`
(spawned workers inherit the driver's sys.path, which holds this folder under pytest)."""

import os
import sys

FLOOD_LINES, FLOOD_LINE = 2000, "x" * 1000
FLOOD_RAW = 1_000_000  # bytes each to sys.stderr and straight to file descriptor 1


def as_returned(response, sample):
    """Returns what the response spells: a float (inf and nan too), or True / False as bools."""
    return {"True": True, "False": False}[response] if response in ("True", "False") else float(response)


def flood(response, sample):
    """Prints megabytes, through Python's streams and to the file descriptor; scores 0.5."""
    print(f"flood-start {response}")
    for _ in range(FLOOD_LINES):
        print(FLOOD_LINE)
    sys.stderr.write("e" * FLOOD_RAW)
    os.write(1, b"f" * FLOOD_RAW)
    return 0.5


def flood_bytes(response: str) -> int:
    """How many bytes `flood` writes for `response`."""
    return len(f"flood-start {response}\n") + FLOOD_LINES * (len(FLOOD_LINE) + 1) + 2 * FLOOD_RAW


def chatty(response, sample):
    """Prints one line; scores 1."""
    print(f"checking {response!r}")
    return 1.0
