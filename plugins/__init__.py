"""oomkit's first-party plugins: policy, registered through the ``oomkit`` entry-point group
exactly like third-party plugins."""
