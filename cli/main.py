"""The ``dithooks`` command line: the app and the order of its commands, nothing else.

Each command lives in its own module (``*_cmd.py``) with a ``register(app)``; shared options are
declared once in :mod:`.run_options`, and what every sampling command does around its run is in
:mod:`.running`. Command modules never import this module (data flows one way: commands -> app).
"""

from __future__ import annotations

import typer

from . import (capture_cmd, hooks_cmd, locality_cmd, probe_cmd, protocol2_cmd, protocol_cmd, query_cmd,
               report_cmd, store_cmd, train_cmd)
from .output import OneLineErrors
# backwards-compatible names (older code imported these from here)
from .run_options import MODEL_HELP, parse_int_list  # noqa: F401
from .running import announce_plan, sigterm_as_interrupt as _sigterm_as_interrupt  # noqa: F401

app = typer.Typer(
    name="dithooks",
    help="See inside a Diffusion Transformer while it samples: capture hook points to Zarr, query them.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    cls=OneLineErrors,  # usage errors are one line too
)

# the order of `dithooks --help`
for _module in (capture_cmd, store_cmd, query_cmd, hooks_cmd, train_cmd, probe_cmd, protocol2_cmd, report_cmd,
                locality_cmd, protocol_cmd):
    _module.register(app)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
