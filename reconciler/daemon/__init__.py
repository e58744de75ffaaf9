"""`reconciler run`: source, loop, server, store, config, metrics."""
