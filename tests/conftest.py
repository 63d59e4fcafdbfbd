"""Shared fixtures (the web app's and worker's live in tests/appfixtures.py), and how the
suite runs in parallel under pytest-xdist (`./test.sh` uses ``-n auto --dist loadgroup``)."""
import os

import pytest

pytest_plugins = ["tests.appfixtures"]

# Tests that share one service instance beyond what each gives itself run on one xdist
# worker, one after another: Redis databases are numbered (not created per test), and two
# headless Chromiums with a served app each would starve a 2-core machine. PostgreSQL
# tests create a uniquely named database each and need no group.
SHARED = ("redis", "browser")


def pytest_collection_modifyitems(config, items):
    for item in items:
        for name in SHARED:
            if item.get_closest_marker(name):
                item.add_marker(pytest.mark.xdist_group(name))
                break


if os.environ.get("PYTEST_XDIST_WORKER"):
    # One torch thread per worker: the workers already fill the cores, and OpenMP threads
    # spin-waiting on each other's cores cost more than they give on small tensors.
    import torch

    torch.set_num_threads(1)
