"""Models built on the LORS core. ``lors.models.adamixer``: the AdaMixer detector."""
