"""Callbacks of this project (Composer callbacks registered in the ``callbacks`` registry)."""
