"""Shared pytest set-up: the lab plugin (lab_factory fixture, `lab` marker)."""

pytest_plugins = ["reconciler.lab.pytest_plugin"]
