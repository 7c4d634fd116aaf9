"""The suite runs on two pytest-xdist workers (pyproject's `-n 2 --dist loadgroup`); conftest groups the tests so that
each session model is trained once and each module's fixtures are built once. Where xdist stops honouring the groups
(pytest-xdist issue #1386: on pytest 9.2 it silently distributes test by test), this fails instead of the suite
quietly training every shared model on both workers."""
import pytest


def test_each_test_carries_its_xdist_group(request):
    if not getattr(request.config.option, "loadgroup", False):
        pytest.skip("not run on xdist workers with --dist loadgroup")
    assert request.node.nodeid.endswith("@test_parallel_groups"), request.node.nodeid
