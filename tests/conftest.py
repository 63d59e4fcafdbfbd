"""Shared fixtures. The web app's and worker's live in tests/appfixtures.py."""
pytest_plugins = ["tests.appfixtures"]
