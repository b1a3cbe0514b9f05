"""What a capture store says about itself: the request, the environment, and what it holds."""

from __future__ import annotations

import datetime as _dt
import platform
from typing import Any

import numpy as np

from ..layers import format_layers

# 1: fill value 0, chunks equal to it not written. 2: fill value NaN for floating arrays, every
# chunk written and checksummed (CRC32C), non-finite counts and the making command in the metadata
FORMAT_VERSION = 2
ATTR_KEY = "dithooks"

# Fields of the request that must match for --resume to continue a store.
# Text-conditioned stores add "prompts" and "prompt_embeds" (its sha256); older stores lack them
# (None on both sides for class-conditional requests).
RESUME_KEYS = ("model_id", "model_config", "sampler", "seeds", "labels", "hooks", "layers",
               "storage_dtype", "compute_dtype", "extras", "prompts", "prompt_embeds")


def now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def library_versions() -> dict[str, str]:
    import diffusers
    import torch
    import zarr

    from .. import __version__

    return {"dithooks": __version__, "torch": torch.__version__, "diffusers": diffusers.__version__,
            "zarr": zarr.__version__, "numpy": np.__version__, "python": platform.python_version()}


def jsonable(obj: Any) -> Any:
    """Config dicts hold tuples, numpy scalars and the like; make them plain JSON."""
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items() if not str(k).startswith("_")}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (np.floating,)):
        return float(obj)
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        return obj
    return str(obj)


def completeness(steps_complete: np.ndarray) -> dict[str, Any]:
    """Summary of which steps are on disk: counts, the resumable prefix and any holes."""
    done = np.flatnonzero(steps_complete).tolist()
    total = int(steps_complete.size)
    prefix = int(np.argmin(steps_complete)) if not steps_complete.all() else total
    return {"steps_total": total, "steps_complete": len(done), "complete": len(done) == total,
            "resume_from_step": prefix, "complete_steps": format_layers(done) or "none"}


# -- which command made a store, and how to continue it ---------------------------------------
def invocation() -> dict[str, Any]:
    """The ``dithooks`` command running now: ``{"name", "argv", "resume_option"}``; ``name`` is
    None when called from Python. ``argv`` is the exact command line when it is known."""
    import sys

    ctx = None
    for module in ("typer._click.globals", "click"):  # typer may carry its own copy of click
        try:
            import importlib

            ctx = importlib.import_module(module).get_current_context(silent=True)
        except (ImportError, AttributeError):
            continue
        if ctx is not None:
            break
    if ctx is None or ctx.command is None:
        return {"name": None, "argv": None, "resume_option": True}
    name = ctx.info_name
    params = {p.name for p in ctx.command.params}
    argv = list(sys.argv[1:]) if sys.argv[1:2] == [name] else None  # not under a test runner
    return {"name": name, "argv": argv, "resume_option": "resume" in params}


def _quote(args: list[str]) -> str:
    import shlex

    return shlex.join(args)


def how_to_continue(meta: dict[str, Any], store: Any, command: dict[str, Any] | None = None) -> str:
    """What to run to continue an incomplete store: the command that made it, with --resume
    (or, for a command without --resume, the same command with --overwrite)."""
    cmd = command if command is not None else meta.get("command")
    probes = [p.get("name") for p in meta.get("probes") or [] if isinstance(p, dict)]
    if not isinstance(cmd, dict):  # stores from before commands were recorded
        cmd = {"name": "probe" if probes else "capture", "argv": None, "resume_option": True}
    name, argv = cmd.get("name"), cmd.get("argv")
    if name is None:
        return (f"continue it with mode=\"resume\" (--resume on the command line) and the same settings, "
                f"out={str(store)!r}")
    resumable = cmd.get("resume_option", True)
    flag = "--resume" if resumable else "--overwrite"
    if argv:
        args = [a for a in argv if a not in ("--resume", "--overwrite")]
        if not any(a in ("--out", "-o") or a.startswith("--out=") for a in args):
            args += ["--out", str(store)]
        text = f"`dithooks {_quote(args + [flag])}`"
    else:
        what = f"probe {probes[0]}" if name == "probe" and probes else name
        text = f"`dithooks {what} {flag} --out {_quote([str(store)])} ...` (with the options it was started with)"
    if resumable:
        return f"continue with {text}"
    return f"`dithooks {name}` cannot resume: run it again with {text}"
