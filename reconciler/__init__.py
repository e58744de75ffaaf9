"""reconciler: an event-driven GitOps reconciler for a fleet of Linux servers."""

__version__ = "0.1.0"
