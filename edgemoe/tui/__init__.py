"""The terminal UI: `edgemoe chat` (ChatApp) and `edgemoe monitor` (MonitorApp), reading the
stats dict of edgemoe.runtime.snapshot. Importing this package does not import Textual."""
