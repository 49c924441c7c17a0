"""Input checks where values enter kvjax: parameters, seeds, state layouts, CLI arguments.

Every check raises `ValueError` (or, for the CLIs, `argparse.ArgumentTypeError`) naming the
field and the allowed values. Parameter checks only look at concrete values (Python numbers,
numpy arrays, concrete jax arrays); traced values inside `jit` / `vmap` / `grad` pass through
unchecked, so the same dataclasses stay usable in compiled code.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from collections.abc import Mapping
from typing import Any

import numpy as np

SEED_RANGE = (0, 2**32)  # seeds are uint32 (jax.random.PRNGKey folds larger ints)
INT32_MAX = 2**31 - 1
FLOAT32_MAX = float(np.finfo(np.float32).max)


# -- parameters ------------------------------------------------------------------------------
class Spec:
    """Allowed values of one numeric field: `integer` (a count) or real; bounds with open or
    closed ends; or a finite set of `choices`."""

    def __init__(
        self,
        lo: float | None = None,
        hi: float | None = None,
        *,
        lo_open: bool = False,
        hi_open: bool = False,
        integer: bool = False,
        choices: Mapping[int, str] | None = None,
    ):
        self.lo, self.hi, self.lo_open, self.hi_open = lo, hi, lo_open, hi_open
        self.integer, self.choices = integer, choices

    def describe(self) -> str:
        if self.choices:
            return "one of " + ", ".join(f"{k} ({v})" for k, v in self.choices.items())
        kind = "an integer" if self.integer else "a finite number"
        lo = "" if self.lo is None else f"{'>' if self.lo_open else '>='} {self.lo:g}"
        hi = "" if self.hi is None else f"{'<' if self.hi_open else '<='} {self.hi:g}"
        bounds = " and ".join(b for b in (lo, hi) if b)
        return f"{kind} {bounds}".strip()

    def ok(self, x: np.ndarray) -> np.ndarray:
        good = np.isfinite(x)
        if self.choices:
            return good & np.isin(x, list(self.choices))
        if self.lo is not None:
            good &= (x > self.lo) if self.lo_open else (x >= self.lo)
        if self.hi is not None:
            good &= (x < self.hi) if self.hi_open else (x <= self.hi)
        return good


def concrete(value: Any) -> np.ndarray | None:
    """`value` as a numpy array if it is a concrete number / array, else None (tracers,
    shape structs, None and placeholder objects are not checked)."""
    import jax

    if value is None or isinstance(value, jax.core.Tracer | jax.ShapeDtypeStruct):
        return None
    if isinstance(value, str | bytes):
        return np.asarray(value)  # rejected by the caller (dtype kind U / S)
    try:
        arr = np.asarray(value)
    except Exception:  # noqa: BLE001 - anything numpy cannot read is not ours to check
        return None
    return None if arr.dtype == object else arr


def check_field(owner: str, name: str, value: Any, spec: Spec) -> None:
    """Raise ValueError unless every element of a concrete `value` satisfies `spec`."""
    arr = concrete(value)
    if arr is None:
        return
    allowed = spec.describe()
    if arr.dtype.kind == "b" or arr.dtype.kind not in "iuf":
        raise ValueError(
            f"{owner}.{name} must be {allowed}, got {value!r} (type {type(value).__name__})"
        )
    if spec.integer and arr.dtype.kind == "f":
        raise ValueError(f"{owner}.{name} must be {allowed} (an integer type), got {value!r}")
    x = arr.astype(np.float64)
    bad = ~spec.ok(x)
    if spec.integer:
        bad |= np.abs(x) > INT32_MAX  # would wrap in int32
    else:
        bad |= np.abs(x) > FLOAT32_MAX  # would overflow to inf in float32
    if bad.any():
        shown = arr[bad].flat[0].item() if arr.ndim else value
        where = "" if not x.ndim else f" at index {tuple(int(i) for i in np.argwhere(bad)[0])}"
        raise ValueError(f"{owner}.{name} must be {allowed}, got {shown!r}{where}")


def check_fields(owner: str, obj: Any, specs: Mapping[str, Spec]) -> None:
    for name, spec in specs.items():
        check_field(owner, name, getattr(obj, name), spec)


# -- seeds -----------------------------------------------------------------------------------
def check_seed(seed: Any, name: str = "seed") -> int:
    """A Python int in [0, 2**32) -> the int; anything else -> ValueError."""
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer):
        raise ValueError(f"{name} must be an integer in [0, 2**32), got {seed!r}")
    if not SEED_RANGE[0] <= int(seed) < SEED_RANGE[1]:
        raise ValueError(f"{name} must be in [0, 2**32) = [0, 4294967295], got {seed}")
    return int(seed)


# -- state layouts ---------------------------------------------------------------------------
def batch_layout(state: Any) -> str:
    """'single', 'trailing' (kvjax's batch-trailing layout, slots [S, n]) or 'leading'
    (what jax.vmap(env.reset_env) returns, slots [n, S]), from static shapes alone."""
    t = np.shape(state.time)
    if len(t) == 0:
        return "single"
    n = t[-1]
    slots = np.shape(state.slots.active)
    arrivals = np.shape(state.arrivals.valid)
    if len(slots) == 2 and len(arrivals) == 3 and slots[-1] == n and arrivals[-1] == n:
        return "trailing"
    return "leading"


def check_single(state: Any, fn: str, trailing_ok: bool = False, hint: str | None = None) -> None:
    """Reject a batched state in a function that takes one scenario (static shapes only, so it
    works under jit; inside jax.vmap the state is unbatched)."""
    layout = batch_layout(state)
    if layout == "single" or (trailing_ok and layout == "trailing"):
        return
    shape = tuple(np.shape(state.time))
    hint = hint or f"map it over the batch with jax.vmap, e.g. jax.vmap({fn}, in_axes=(0, None))"
    raise ValueError(
        f"{fn} takes one scenario, got a batched state ({layout} batch axis, time has shape "
        f"{shape}); {hint}"
    )


# -- command lines ---------------------------------------------------------------------------
class ArgumentParser(argparse.ArgumentParser):
    """argparse with a one-line error (`prog: error: message`, exit code 2) and no usage
    block; subparsers inherit it."""

    def error(self, message: str):  # noqa: D401 - argparse API
        self.exit(2, f"{self.prog}: error: {message}\n")


def seed_arg(text: str) -> int:
    """argparse type: an integer seed in [0, 2**32)."""
    try:
        return check_seed(int(text))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"must be an integer in [0, 4294967295], got {text!r}"
        ) from None


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1 that fits in int32."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}") from None
    if not 1 <= value <= INT32_MAX:
        raise argparse.ArgumentTypeError(f"must be a positive integer <= {INT32_MAX}, got {text}")
    return value


def real_arg(
    lo: float | None = None,
    hi: float | None = None,
    *,
    lo_open: bool = False,
    hi_open: bool = False,
):
    """argparse type factory: a finite float within the given bounds."""
    spec = Spec(lo, hi, lo_open=lo_open, hi_open=hi_open)

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {spec.describe()}, got {text!r}") from None
        if not bool(spec.ok(np.float64(value))):
            raise argparse.ArgumentTypeError(f"must be {spec.describe()}, got {text}")
        return value

    parse.__name__ = "number"
    return parse


def _nearest_existing(path: str) -> str:
    p = os.path.abspath(path)
    while not os.path.exists(p):
        parent = os.path.dirname(p)
        if parent == p:
            break
        p = parent
    return p


def check_writable_file(path: str, what: str = "output") -> str:
    """ValueError unless `path` can be written as a file (its directory may not exist yet:
    then the nearest existing ancestor must be a writable directory). Nothing is created."""
    p = os.path.abspath(path)
    if os.path.isdir(p):
        raise ValueError(f"{what} {path!r} is a directory, not a file")
    if os.path.exists(p) and not os.access(p, os.W_OK):
        raise ValueError(f"{what} {path!r} is not writable")
    base = _nearest_existing(os.path.dirname(p))
    if not os.path.isdir(base):
        raise ValueError(f"{what} {path!r}: {base!r} is not a directory")
    if not os.path.exists(p) and not os.access(base, os.W_OK | os.X_OK):
        raise ValueError(f"{what} {path!r}: directory {base!r} is not writable")
    return path


def check_writable_dir(path: str, what: str = "output directory") -> str:
    """ValueError unless `path` is (or can be created as) a writable directory."""
    p = os.path.abspath(path)
    if os.path.exists(p) and not os.path.isdir(p):
        raise ValueError(f"{what} {path!r} exists and is not a directory")
    base = _nearest_existing(p)
    if not os.path.isdir(base):
        raise ValueError(f"{what} {path!r}: {base!r} is not a directory")
    if not os.access(base, os.W_OK | os.X_OK):
        raise ValueError(f"{what} {path!r}: {base!r} is not writable")
    return path


def fail(prog: str, message: str) -> int:
    """Print `prog: error: message` (one line) to stderr and return exit code 2."""
    print(f"{prog}: error: {' '.join(str(message).split())}", file=sys.stderr)
    return 2


def finite(value: float) -> bool:
    return isinstance(value, int | float) and math.isfinite(value)


__all__ = [
    "ArgumentParser",
    "Spec",
    "batch_layout",
    "check_field",
    "check_fields",
    "check_seed",
    "check_single",
    "check_writable_dir",
    "check_writable_file",
    "concrete",
    "fail",
    "positive_int",
    "real_arg",
    "seed_arg",
]
