"""oomkit's first-party plugins.

Each module holds one plugin class, registered through the ``oomkit`` entry-point group exactly
as a third-party plugin would be, so each can be disabled (``[plugins] disable``) or replaced.
Every class reads its own ``[plugins.<name>]`` table; ``name`` is that table's name and the
entry point's.
"""
