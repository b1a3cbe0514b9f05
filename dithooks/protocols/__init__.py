"""The seed paper's experimental protocols, end to end (paper §3-4, THEORY §6).

- :mod:`.protocol1`: when replica pairs commit (t_spec, coarse/fine output gap) - ``dithooks protocol1``;
- :mod:`.fits`: sigmoid fits and bootstrap CIs; :mod:`.pixels`: coarse/fine discrepancies;
- :mod:`.encoders`: feature encoders for semantic agreement; :mod:`.store`: resumable results
  stores; :mod:`.plots`: figures.
"""

from .protocol1 import Protocol1, Protocol1Request, read_t_spec, run_protocol1

__all__ = ["Protocol1", "Protocol1Request", "read_t_spec", "run_protocol1"]
