from flask_wtf import FlaskForm
from wtforms import BooleanField, EmailField, PasswordField, SelectField, SubmitField
from wtforms.validators import DataRequired, Length

from webapp.models import ROLES


class CreateUserForm(FlaskForm):
    email = EmailField("Email", validators=[DataRequired(), Length(max=254)])
    # The rule (length, common passwords) is accounts.check_password_rule, as on the command line.
    password = PasswordField("Initial password", validators=[DataRequired(), Length(max=200)])
    role = SelectField("Role", choices=list(ROLES), default="clinician")
    submit = SubmitField("Create user")


class RoleForm(FlaskForm):
    role = SelectField("Role", choices=list(ROLES))
    submit = SubmitField("Change role")


class DeactivateForm(FlaskForm):
    submit = SubmitField("Deactivate")


class ResetPasswordForm(FlaskForm):
    password = PasswordField("Temporary password", validators=[DataRequired(), Length(max=200)])
    submit = SubmitField("Reset password")


class UnlockForm(FlaskForm):
    submit = SubmitField("Unlock")


class ActivationForm(FlaskForm):
    """Promote or roll back a model version: the CSRF token, a button and, for a version
    the promotion gate refused, an explicit override."""

    force = BooleanField("Override the promotion gate")
    submit = SubmitField("Make active")
