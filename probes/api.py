"""The probe API, re-exported: it lives in the core as :mod:`dithooks.probe_api` (see there).

Probes import from here or from ``dithooks.probe_api``; both name the same objects (one
registry, one ``Probe`` base class).
"""

from dithooks.probe_api import *  # noqa: F401,F403
from dithooks.probe_api import (BUILTIN_MODULES, Option, Output, Probe, ProbeError, RunInfo,  # noqa: F401
                                _import_error, _import_probe_module, _plain, _REGISTRY, make_probe,
                                parse_band, parse_bool, parse_option_texts, probe_class, register_probe,
                                registered_probes, unbatch)
