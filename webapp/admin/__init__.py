"""Admin pages: accounts and the model registry (read-only here)."""
