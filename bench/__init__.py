"""oomkit's benchmarks.  Run them all with ``make bench`` (``python -m bench``), or one with
``python -m bench NAME``; each prints a table with the machine and the command."""
