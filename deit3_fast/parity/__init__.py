"""Does the fast path train as well as the official one? Statistics over seeds for `deit3-fast parity` (stats.py)."""
