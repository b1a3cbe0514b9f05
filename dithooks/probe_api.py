"""The probe API (the core's contract with probes): measure something online while a capture samples, store it beside the captures.

A probe is a small class (see ``docs/writing-probes.md``)::

    @register_probe("my_probe")
    class MyProbe(Probe):
        needs = ("resid_post",)                      # hook points, expanded per --layers
        options = {"eps": Option(1e-6, "a float option")}

        def start(self, run): ...                    # once, before the first step: reset state
        def observe(self, name, value, ctx): ...     # every hooked value of the step
        def end_step(self, step): return {...}       # name -> Output (per step; "step" is added)
        def finish(self): return {...}               # name -> Output (once, after the last step)

Outputs are stored as ``probe.<probe name>.<output name>``: per-step outputs get a leading
``step`` dim (one chunk per step), ``finish`` outputs are stored as they are. A dim named
``layer`` must come first and run over the captured layers, so xarray aligns it with the
store's ``layer`` coordinate.

Memory: a probe must reduce online. ``observe`` gets the live value (copy what you keep; never
modify it) and should keep only what ``end_step`` needs for this step, plus whatever fixed
state it carries (e.g. a step-0 basis); nothing may grow with the number of steps.

Where things live: this module (``dithooks.probe_api``) is the contract, part of the core; the
capture runs probes through :mod:`dithooks.probe_runner`; the probes themselves live in
``probes/`` (installed as ``dithooks.probes``; ``dithooks.probes.api`` re-exports this module) and
are found by name through the registry below, which imports the built-in modules by name on
first use (the core never imports them otherwise).

Resume: a probe is ``resumable`` only if its outputs at a step depend on nothing but that
step's values (no state carried across steps, and ``finish`` outputs likewise). A store whose
probes are not all resumable cannot be resumed mid-way; the capture refuses with a clear error.
"""

from __future__ import annotations

import difflib
import importlib
import importlib.util
import inspect
import math
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Mapping, Sequence

import numpy as np
import torch

from .errors import DithooksError
from .hooks import HookContext

__all__ = ["Probe", "Option", "Output", "RunInfo", "ProbeError", "register_probe", "registered_probes",
           "probe_class", "make_probe", "unbatch", "parse_bool", "parse_band", "parse_option_texts"]


class ProbeError(DithooksError):
    """A probe that cannot be found, configured or run as asked (one-line message)."""


# -- options --------------------------------------------------------------------------------

def parse_bool(text: str) -> bool:
    t = text.strip().lower()
    if t in ("1", "true", "yes", "on"):
        return True
    if t in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"{text!r} is not a boolean (true/false)")


def parse_band(text: str) -> float | int | list[int]:
    """A band spec of THEORY [78–79] from text: ``0.25`` (fraction), ``3`` (count), ``0,1,2`` (indices)."""
    t = text.strip()
    if "," in t or t.startswith("["):
        return [int(x) for x in t.strip("[]").split(",") if x.strip()]
    return float(t) if any(c in t for c in ".eE") else int(t)


@dataclass(frozen=True)
class Option:
    """One probe option: its default, a one-line help, and how to read it from CLI text.

    ``parse`` defaults to the type of ``default`` (int, float, bool, str).
    """

    default: Any
    help: str = ""
    parse: Callable[[str], Any] | None = None

    def from_text(self, text: str) -> Any:
        if self.parse is not None:
            return self.parse(text)
        if isinstance(self.default, bool):
            return parse_bool(text)
        if isinstance(self.default, float):
            return float(text)
        if isinstance(self.default, int):
            return int(text)
        return text


# -- what a probe sees and returns ------------------------------------------------------------

@dataclass(frozen=True)
class RunInfo:
    """What a probe knows about the run before the first step (given to :meth:`Probe.start`).

    ``hook_names``: this probe's hook points, resolved (``blocks.3.resid_post``, ...).
    ``batch_axes``: the model batch layout, outermost first, e.g. ``(("cfg", 2), ("sample", 4))``.
    ``first_step``: 0, or where a resumed capture continues (only resumable probes see > 0).
    ``num_tokens``: N, so a probe can check token-indexed options before anything runs.
    ``labels``: each sample's class label; for text-conditioned models (PixArt, SD3, Flux) each
    sample's row of the prompt embeddings (the store's ``prompt`` coordinate).
    """

    steps: int
    layers: tuple[int, ...]
    batch_axes: tuple[tuple[str, int], ...]
    labels: tuple[int, ...]
    seeds: tuple[int, ...]
    timesteps: tuple[int, ...]
    hook_names: tuple[str, ...]
    first_step: int = 0
    num_tokens: int | None = None  # tokens per sample (N), when the model says so

    @property
    def batch_dims(self) -> tuple[str, ...]:
        return tuple(a for a, _ in self.batch_axes)

    @property
    def batch_shape(self) -> tuple[int, ...]:
        return tuple(n for _, n in self.batch_axes)

    def layer_pos(self, layer: int) -> int:
        """Position of block ``layer`` along an output's ``layer`` dim."""
        return self.layers.index(layer)


@dataclass
class Output:
    """One named output array: values and the names of their dims (without ``step``).

    Floating values are stored as float32 unless ``dtype`` says otherwise.
    """

    values: Any  # torch.Tensor or numpy array
    dims: tuple[str, ...]
    description: str = ""
    dtype: torch.dtype | None = None

    def tensor(self) -> torch.Tensor:
        t = self.values if isinstance(self.values, torch.Tensor) else torch.as_tensor(np.asarray(self.values))
        t = t.detach().to("cpu")
        dtype = self.dtype or (torch.float32 if t.is_floating_point() else t.dtype)
        return t.to(dtype).contiguous().clone()


def unbatch(value: torch.Tensor, ctx: HookContext) -> torch.Tensor:
    """``[batch, ...]`` → ``[*batch_axes sizes, ...]``, e.g. ``[cfg, sample, token, channel]``."""
    return value.reshape(tuple(n for _, n in ctx.batch_axes) + tuple(value.shape[1:]))


# -- the base class ------------------------------------------------------------------------------

class Probe:
    """Base class of probes; subclass it, set ``needs``/``options``, override the four methods.

    Options are passed as keywords (or ``key=value`` text from the CLI) and are available as
    ``self.opts[name]``; unknown names are refused.
    """

    name: ClassVar[str] = ""
    needs: ClassVar[tuple[str, ...]] = ()
    options: ClassVar[dict[str, Option]] = {}
    resumable: ClassVar[bool] = False

    def __init__(self, **options: Any):
        unknown = [k for k in options if k not in self.options]
        if unknown:
            close = difflib.get_close_matches(unknown[0], list(self.options), 3, 0.5)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            have = ", ".join(self.options) or "none"
            raise ProbeError(f"probe {self.label()} has no option {unknown[0]!r}{hint} (its options: {have})")
        self.opts: dict[str, Any] = {}
        for key, opt in self.options.items():
            value = options.get(key, opt.default)
            # text (from the CLI) is parsed; Python values are taken as given
            if isinstance(value, str) and (opt.parse is not None or not isinstance(opt.default, str)):
                try:
                    value = opt.from_text(value)
                except (TypeError, ValueError) as e:
                    raise ProbeError(f"probe {self.label()}: bad value {value!r} for option {key!r} ({e})") from None
            self.opts[key] = value
        try:
            self.check_options()
        except ProbeError:
            raise
        except (TypeError, ValueError) as e:  # the documented alternative to ProbeError
            raise ProbeError(f"probe {self.label()}: {e}") from e

    @classmethod
    def label(cls) -> str:
        return cls.name or cls.__qualname__

    def check_options(self) -> None:
        """Refuse bad option values early; nothing to check by default.

        Raise :class:`ProbeError` (or ``ValueError``/``TypeError``, which are reported the same
        way) with a one-line message: the CLI prints it, prefixed with the probe's name, before
        any store exists.
        """

    def hook_points(self) -> tuple[str, ...]:
        """Hook points this probe reads; short names expand to every captured layer."""
        return tuple(self.needs)

    def start(self, run: RunInfo) -> None:
        """Called once before the first step; (re)set all state here."""

    def observe(self, name: str, value: torch.Tensor, ctx: HookContext) -> None:
        """One hooked value (live: do not modify it; copy or reduce what you keep)."""
        raise NotImplementedError

    def end_step(self, step: int) -> Mapping[str, Output]:
        """Outputs of ``step`` (dims without ``step``); called after every value of the step."""
        return {}

    def finish(self) -> Mapping[str, Output]:
        """Outputs computed once, after the last step (stored without a ``step`` dim)."""
        return {}

    def describe(self) -> dict[str, Any]:
        """How the probe is recorded in the store metadata (and compared on resume)."""
        cls = type(self)
        return {"name": self.label(), "class": f"{cls.__module__}:{cls.__qualname__}",
                "options": _plain(self.opts), "resumable": bool(self.resumable)}


def _plain(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        return obj
    return str(obj)


# -- registry ------------------------------------------------------------------------------------

_REGISTRY: dict[str, type[Probe]] = {}
BUILTIN_MODULES = ("dithooks.probes.builtin", "dithooks.probes.width", "dithooks.probes.routing")


def register_probe(name: str) -> Callable[[type[Probe]], type[Probe]]:
    """Class decorator: make ``cls`` available as ``dithooks probe NAME`` and ``probes=("NAME",)``."""

    def add(cls: type[Probe]) -> type[Probe]:
        if not (inspect.isclass(cls) and issubclass(cls, Probe)):
            raise TypeError(f"register_probe({name!r}) decorates Probe subclasses, not {cls!r}")
        old = _REGISTRY.get(name)
        # re-importing or re-executing the same class is fine; two different classes are not
        if old is not None and (old.__module__, old.__qualname__) != (cls.__module__, cls.__qualname__):
            raise ProbeError(f"probe name {name!r} is taken by {old.__module__}:{old.__qualname__}")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return add


def _mount_source_probes() -> None:
    """Run from a source tree (not installed), ``probes/`` beside ``dithooks/`` is not yet the
    package ``dithooks.probes`` (pyproject's package-dir maps it on install): mount it so."""
    import sys
    from pathlib import Path

    if "dithooks.probes" in sys.modules or importlib.util.find_spec("dithooks.probes") is not None:
        return
    folder = Path(__file__).resolve().parent.parent / "probes"
    if not (folder / "__init__.py").is_file():
        return
    spec = importlib.util.spec_from_file_location("dithooks.probes", folder / "__init__.py",
                                                  submodule_search_locations=[str(folder)])
    module = importlib.util.module_from_spec(spec)
    sys.modules["dithooks.probes"] = module
    spec.loader.exec_module(module)


def registered_probes() -> dict[str, type[Probe]]:
    """Every registered probe by name (the built-ins are imported first)."""
    _mount_source_probes()
    for mod in BUILTIN_MODULES:
        importlib.import_module(mod)
    return dict(sorted(_REGISTRY.items()))


def probe_class(spec: str) -> type[Probe]:
    """A probe class from a registered name (``difference_modes``), an importable
    ``package.module:Class``, or a file ``path/to/probe.py:Class``."""
    if ":" in spec:
        mod_name, _, attr = spec.rpartition(":")
        attr = attr.strip()
        if not mod_name or not attr:
            raise ProbeError(f"malformed probe {spec!r}: use package.module:ClassName or path/to/file.py:ClassName")
        mod = _import_probe_module(mod_name.strip())
        cls = getattr(mod, attr, None)
        if cls is None:
            found = sorted(n for n, c in vars(mod).items()
                           if inspect.isclass(c) and issubclass(c, Probe) and c is not Probe)
            close = difflib.get_close_matches(attr, found, 3, 0.5)
            hint = (f"; did you mean {', '.join(close)}?" if close
                    else f" (its Probe classes: {', '.join(found)})" if found else " (it defines no Probe class)")
            raise ProbeError(f"probe module {mod_name!r} has no class {attr!r}{hint}")
        if not (inspect.isclass(cls) and issubclass(cls, Probe)):
            what = f"class {cls.__name__}" if inspect.isclass(cls) else f"a {type(cls).__name__}"
            raise ProbeError(f"{spec!r} is {what}, not a subclass of dithooks.probes.api.Probe")
        return cls
    known = registered_probes()
    if spec not in known:
        close = difflib.get_close_matches(spec, list(known), 3, 0.5)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise ProbeError(f"unknown probe {spec!r}{hint} (`dithooks probes` lists them; "
                         "your own: package.module:ClassName or path/to/file.py:ClassName)")
    return known[spec]


def _import_error(what: str, e: BaseException) -> ProbeError:
    if isinstance(e, SyntaxError):
        where = f" ({e.filename}, line {e.lineno})" if e.filename else ""
        return ProbeError(f"cannot import probe {what}: SyntaxError: {e.msg}{where}")
    text = " ".join(str(e).split()) or type(e).__name__
    return ProbeError(f"cannot import probe {what}: {type(e).__name__}: {text}")


def _import_probe_module(name: str):
    """A module by import path, or a ``.py`` file loaded by path (its folder goes on ``sys.path``
    so that it can import its neighbours)."""
    import hashlib
    import importlib.util
    import sys
    from pathlib import Path

    if name.endswith(".py") or "/" in name or "\\" in name:
        path = Path(name).expanduser()
        if not path.is_file():
            raise ProbeError(f"no probe file {name!r}" + (" (a folder)" if path.is_dir() else ""))
        path = path.resolve()
        stem = "".join(c if c.isalnum() or c == "_" else "_" for c in path.stem)
        mod_name = f"dithooks_user_probe_{stem}_{hashlib.sha1(str(path).encode()).hexdigest()[:8]}"
        if mod_name in sys.modules:
            return sys.modules[mod_name]
        spec = importlib.util.spec_from_file_location(mod_name, path)
        if spec is None or spec.loader is None:
            raise ProbeError(f"cannot load {name!r} as a Python module")
        mod = importlib.util.module_from_spec(spec)
        folder = str(path.parent)
        if folder not in sys.path:
            sys.path.insert(0, folder)
        sys.modules[mod_name] = mod
        try:
            spec.loader.exec_module(mod)
        except BaseException as e:
            del sys.modules[mod_name]
            if isinstance(e, KeyboardInterrupt):
                raise
            raise _import_error(f"file {name!r}", e) from e
        return mod
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as e:
        if e.name and name.split(".")[0] == e.name.split(".")[0]:
            here = Path(name.replace(".", "/") + ".py")
            hint = (f"; it is in the current folder: use ./{here}:ClassName or PYTHONPATH=." if here.is_file()
                    else "; put its folder on PYTHONPATH, or give a file: path/to/file.py:ClassName")
            raise ProbeError(f"cannot import probe module {name!r}: no module named {e.name!r}{hint}") from None
        raise _import_error(f"module {name!r}", e) from e
    except KeyboardInterrupt:
        raise
    except BaseException as e:  # a syntax error, or anything the module raises while importing
        raise _import_error(f"module {name!r}", e) from e


def make_probe(spec: Probe | str | tuple | Sequence, options: Mapping[str, Any] | None = None) -> Probe:
    """A probe instance from an instance, a name / import path, or ``(name, {options})``."""
    if isinstance(spec, Probe):
        if options:
            raise ProbeError("options go to the probe's constructor when you pass an instance")
        return spec
    if isinstance(spec, (tuple, list)) and len(spec) == 2 and isinstance(spec[1], Mapping):
        return make_probe(spec[0], {**spec[1], **(options or {})})
    if isinstance(spec, str):
        cls = probe_class(spec)
        try:
            return cls(**dict(options or {}))
        except DithooksError:
            raise
        except Exception as e:  # the probe's own __init__ (or check_options) failed
            raise ProbeError(f"probe {cls.label()}: cannot create it: {type(e).__name__}: {e}") from e
    raise ProbeError(f"cannot make a probe from {spec!r}: give a Probe, a name, or (name, options)")


def parse_option_texts(texts: Sequence[str]) -> dict[str, str]:
    """CLI ``key=value`` pairs → dict (values stay text; the probe parses them)."""
    out: dict[str, str] = {}
    for t in texts:
        key, eq, value = t.partition("=")
        if not eq or not key.strip():
            raise ProbeError(f"malformed probe option {t!r}: use key=value")
        out[key.strip()] = value.strip()
    return out
