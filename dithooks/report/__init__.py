"""``dithooks report``: one self-contained HTML page for any mix of dithooks stores.

:func:`build_report` reads each store, :func:`write_report` writes the page. See
:mod:`dithooks.report.html` for what each kind of store contributes.
"""

from .html import build_report, store_section, write_report

__all__ = ["build_report", "store_section", "write_report"]
