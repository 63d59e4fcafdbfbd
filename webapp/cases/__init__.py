"""Upload, case list, case page, status endpoint, re-run and the authenticated file route."""
