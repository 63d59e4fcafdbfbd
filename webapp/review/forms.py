from flask_wtf import FlaskForm
from wtforms import BooleanField, HiddenField, RadioField, SelectField, SubmitField, TextAreaField
from wtforms.fields.choices import SelectChoice
from wtforms.validators import Length, Optional

from webapp.models import CONFIDENCES, DETAILED_LABELS, VERDICTS

_LABEL_CHOICES = [SelectChoice("", "(the model's label)")] + [SelectChoice(k) for k in DETAILED_LABELS]

# Choices are checked by webapp.reviews (one place, one message); the forms only carry
# the values and the CSRF token, so that a bad value gets the same clear answer from
# the page and from any other client.


class ReviewForm(FlaskForm):
    verdict = RadioField("Do you agree with the model?", choices=[SelectChoice(v) for v in VERDICTS], validate_choice=False)
    label = SelectField("Your label (needed when you disagree)", choices=_LABEL_CHOICES, validate_choice=False)
    confidence = RadioField("Confidence", choices=[SelectChoice(c) for c in CONFIDENCES], validate_choice=False)
    comment = TextAreaField("Comment (optional)", validators=[Optional(), Length(max=2000)])
    opened = HiddenField()
    queue = HiddenField()  # the queue order the reviewer came from, for "Save & next"
    save_next = SubmitField("Save & next")
    submit = SubmitField("Save review")


class BlindReadForm(FlaskForm):
    label = RadioField("Your label", choices=[SelectChoice(k) for k in DETAILED_LABELS], validate_choice=False)
    confidence = RadioField("Confidence", choices=[SelectChoice(c) for c in CONFIDENCES], validate_choice=False)
    opened = HiddenField()
    queue = HiddenField()
    submit = SubmitField("Save my label and show the model's output")


class BlindedSettingForm(FlaskForm):
    blinded = BooleanField("Blinded review: give my label before I see the model's output")
    submit = SubmitField("Save setting")
