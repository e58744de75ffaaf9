"""What a host is made of: one module per kind of resource (observe, diff, change)."""
