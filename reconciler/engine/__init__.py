"""observe -> plan (pure) -> apply, per host and for a fleet."""
