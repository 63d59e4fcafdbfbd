"""The JSON API under /api/v1: bearer tokens, cases, predictions, reviews, model versions."""
