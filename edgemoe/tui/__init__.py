"""The terminal UI: `edgemoe chat` (ChatApp) and `edgemoe monitor` (MonitorApp).

Importing this package does not import Textual: stats_to_dict is shared with the server, which
serves the same dict as JSON on GET /stats.
"""

from .snapshot import stats_to_dict

__all__ = ["stats_to_dict"]
