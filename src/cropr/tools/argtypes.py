"""argparse value types and help formatting shared by the command lines (`cropr`, `cropr benchmark`, ...).

A value they refuse ends the command with argparse's one-line usage error (exit status 2) before anything slow
starts, instead of a traceback after the models are loaded.
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Callable
from pathlib import Path


class DefaultsHelpFormatter(argparse.HelpFormatter):
    """Appends `(default: ...)` to an option's help where the default says something: not for options without a
    value (flags), nor for those whose default is `None` (their help says what happens then)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        help_text = action.help or ""
        shows_default = (
            action.default is not None
            and action.default is not argparse.SUPPRESS
            and action.nargs != 0
            and "%(default)" not in help_text
        )
        return f"{help_text} (default: %(default)s)" if shows_default else help_text


def bounded_int(minimum: int, maximum: int | None = None) -> Callable[[str], int]:
    """An argparse `type` for an integer in `minimum .. maximum` (no upper bound when `maximum` is None)."""
    expected = f"an integer >= {minimum}" if maximum is None else f"an integer from {minimum} to {maximum}"

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
        if value < minimum or (maximum is not None and value > maximum):
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
        return value

    return parse


def non_negative_float(text: str) -> float:
    """An argparse `type` for a finite number >= 0."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value >= 0):
        raise argparse.ArgumentTypeError(f"expected a finite number >= 0, got {text!r}")
    return value


def output_dir(text: str) -> Path:
    """An argparse `type` for a folder to write into: it and its missing parents are created later, so neither it nor
    its nearest existing parent may be a file."""
    path = Path(text)
    existing = next(folder for folder in (path, *path.parents) if folder.exists())
    if not existing.is_dir():
        raise argparse.ArgumentTypeError(f"{existing} is a file, not a folder")
    return path


def output_file(text: str) -> Path:
    """An argparse `type` for a file to write: not a folder, in a folder that exists."""
    path = Path(text)
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{text} is a folder, not a file")
    if not path.parent.is_dir():
        raise argparse.ArgumentTypeError(f"the folder of {text} does not exist")
    return path


def parse_image_size(value: str) -> int | tuple[int, int]:
    """`224` or `224x320` (height x width), in pixels (at least 1)."""
    try:
        sides = [int(side) for side in value.lower().split("x")]
    except ValueError:
        sides = []
    if len(sides) not in (1, 2) or min(sides) < 1:
        raise argparse.ArgumentTypeError(f"expected an image size such as 224 or 224x320, got {value!r}")
    return sides[0] if len(sides) == 1 else (sides[0], sides[1])


def int_list(minimum: int) -> Callable[[str], list[int]]:
    """An argparse `type` for a comma-separated list of integers >= `minimum`, e.g. `1,8,32`."""

    def parse(text: str) -> list[int]:
        try:
            values = [int(item) for item in text.split(",") if item.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
        if not values or min(values) < minimum:
            raise argparse.ArgumentTypeError(f"expected comma-separated integers >= {minimum}, got {text!r}")
        return values

    return parse


parse_schedule = int_list(0)
"""Tokens removed after each block, comma-separated: `0,0,0,0,0,50,0,...`."""


def parse_shares(text: str) -> list[float]:
    """An argparse `type` for a comma-separated list of shares in [0, 1], e.g. `0,0.5,1`."""
    try:
        values = [float(item) for item in text.split(",") if item.strip()]
    except ValueError:
        values = []
    if not values or not all(0.0 <= value <= 1.0 for value in values):
        raise argparse.ArgumentTypeError(f"expected comma-separated shares in [0, 1], got {text!r}")
    return values


def load_id2label(value: str) -> dict[int, str]:
    """A JSON object `{"0": "cat", ...}` given inline or as the path of a JSON file."""
    path = Path(value)
    text = path.read_text() if path.is_file() else value
    try:
        mapping = json.loads(text)
    except json.JSONDecodeError:
        raise argparse.ArgumentTypeError(f"--id2label is neither a JSON file nor a JSON object: {value!r}") from None
    if not isinstance(mapping, dict):
        raise argparse.ArgumentTypeError('--id2label must be a JSON object such as {"0": "cat", "1": "dog"}')
    return {int(index): str(label) for index, label in mapping.items()}


__all__ = [
    "bounded_int",
    "int_list",
    "load_id2label",
    "non_negative_float",
    "output_dir",
    "output_file",
    "parse_image_size",
    "parse_schedule",
]
