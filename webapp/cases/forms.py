from flask_wtf import FlaskForm
from wtforms import BooleanField, MultipleFileField, SubmitField, TextAreaField
from wtforms.validators import DataRequired, Length, Optional


class UploadForm(FlaskForm):
    images = MultipleFileField("Images (PNG, JPEG or DICOM, one or several)")
    note = TextAreaField("Note (optional)", validators=[Optional(), Length(max=2000)])
    allow_duplicate = BooleanField("Upload again even if an image is already a case")
    submit = SubmitField("Upload")


class RerunForm(FlaskForm):
    """Only a CSRF token: the case id is in the URL."""
    submit = SubmitField("Re-run prediction")


class WithdrawForm(FlaskForm):
    """The CSRF token and a ticked confirmation: withdrawing hides the case for everyone."""
    confirm = BooleanField("Yes, withdraw this case", validators=[DataRequired()])
    submit = SubmitField("Withdraw case")
