from flask_wtf import FlaskForm
from wtforms import MultipleFileField, SubmitField, TextAreaField
from wtforms.validators import Length, Optional


class UploadForm(FlaskForm):
    images = MultipleFileField("Images (PNG or JPEG, one or several)")
    note = TextAreaField("Note (optional)", validators=[Optional(), Length(max=2000)])
    submit = SubmitField("Upload")


class RerunForm(FlaskForm):
    """Only a CSRF token: the case id is in the URL."""
    submit = SubmitField("Re-run prediction")
