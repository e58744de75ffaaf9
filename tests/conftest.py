"""Shared pytest set-up: the lab plugin (lab_factory fixture, `lab` marker) and the skip policy
(tests/skip_policy.py: under RECONCILER_REQUIRE_LAB=1 only a missing kernel feature may skip)."""

pytest_plugins = ["tests.lab_plugin", "tests.skip_policy"]  # test helpers, not product code
