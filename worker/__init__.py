"""Celery worker: thin glue from a queued case to `ml/` and back to the database.

Started by `python manage.py worker` (or by `manage.py run` on a laptop) from the same
`create_app` and configuration as the web app.
"""
