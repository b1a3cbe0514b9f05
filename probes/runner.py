"""Moved into the core: :mod:`dithooks.probe_runner` (re-exported here for old imports)."""

from dithooks.probe_runner import ProbeRunner, Put, probe_array_name  # noqa: F401
