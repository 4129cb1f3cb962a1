"""The terminal UI: `edgemoe chat` (ChatApp) and `edgemoe monitor` (MonitorApp), reading the
Stats of edgemoe.runtime.stats. Importing this package does not import Textual."""
