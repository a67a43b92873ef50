"""Applications built on the framework, one verb each: ``glue``, ``estimate``, ``export``, ``doctor``."""
