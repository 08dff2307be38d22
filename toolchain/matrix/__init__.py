"""Nightly parity: a models x targets matrix of builds, with history, regression alarms and a dashboard.

`spec` reads MATRIX.toml, `cell` runs one build in a process of its own, `run` fans the cells out
(a local pool or Ray), `history` keeps every result in a database, `alarms` compares each cell
with its last passing run, `junit` and `dashboard` show the outcome.
"""
