"""Tables and heatmaps from a routing-probe store: re-exported from
:mod:`dithooks.analysis.routing_summary` (the core's report uses them; this path keeps working)."""

from dithooks.analysis.routing_summary import (  # noqa: F401
    PREFIX,
    TIGHT,
    routing_heatmap,
    routing_summary,
    routing_table,
    summary_lines,
)

__all__ = ["PREFIX", "TIGHT", "routing_table", "routing_summary", "summary_lines", "routing_heatmap"]
