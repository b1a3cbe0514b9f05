"""Analysis shared by the core, the built-in probes and the CLI (no imports from probes/ or cli/).

- :mod:`.modes`: the replica difference-mode basis (Nyström on the dual Gram) and its bands;
- :mod:`.difference_modes`: the ``difference_modes`` probe's implementation (registered by
  ``dithooks.probes.builtin``; Protocol II extends it);
- :mod:`.routing_summary`: tables, summary and heatmap of a store written by the ``routing`` probe.

``dithooks.probes.modes`` and ``dithooks.probes.routing_summary`` re-export these names.
"""
