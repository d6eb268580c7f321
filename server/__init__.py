"""The coordinating server: curriculum, partial-parameter strategy, registry, admin commands."""
