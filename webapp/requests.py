"""The request class of the app: a form part without a field name is a malformed request.

Werkzeug parses ``Content-Disposition: form-data`` without ``name=`` into a field whose key
is None; every consumer (Flask-WTF's CSRF check, our control-character check, WTForms)
assumes string keys and fails with a 500. Such a request is refused with a 400 as soon as
anything reads the form, before any of them sees it.
"""
from __future__ import annotations

from flask import Request
from werkzeug.exceptions import BadRequest


class NamelessFormPart(BadRequest):
    description = ("The request carries a form part without a name (its Content-Disposition has no "
                   "name=\"...\"), so it cannot be read. Send every field and file with its name.")


class AppRequest(Request):
    def _load_form_data(self) -> None:
        super()._load_form_data()
        if None in self.form or None in self.files or "" in self.files:
            raise NamelessFormPart()
