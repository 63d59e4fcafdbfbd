"""Database models: who uses the app, what they uploaded, what the model said, and a log.

Times are stored as naive UTC (`utcnow()`), the same on SQLite and PostgreSQL.
"""
from __future__ import annotations

from contextvars import ContextVar
from datetime import UTC, datetime
from typing import Any

from flask_login import UserMixin
from sqlalchemy import (JSON, Boolean, DateTime, Float, ForeignKey, Index, Integer, String, Text,
                        UniqueConstraint, false, text)
from sqlalchemy.orm import Mapped, mapped_column, relationship
from werkzeug.security import check_password_hash, generate_password_hash

from webapp.extensions import db

ROLES = ("clinician", "reviewer", "admin")
CASE_STATUSES = ("queued", "running", "done", "failed")
LABELS = ("cancer", "normal")
VERDICTS = ("agree", "disagree")
CONFIDENCES = ("certain", "probable", "unsure")
# Finer labels a reviewer may give when the truth is known in more detail, and the
# cancer/normal label each one counts as.
DETAILED_LABELS = {"cancer": "cancer", "normal": "normal", "malignant": "cancer", "benign": "normal"}


def utcnow() -> datetime:
    """The current time as naive UTC, the form every timestamp column holds."""
    return datetime.now(UTC).replace(tzinfo=None)


class User(UserMixin, db.Model):
    """A person who signs in. `role` decides what they may see and do."""

    __tablename__ = "user"
    id: Mapped[int] = mapped_column(primary_key=True)
    email: Mapped[str] = mapped_column(String(254), unique=True)
    password_hash: Mapped[str] = mapped_column(String(256))
    role: Mapped[str] = mapped_column(String(16), default="clinician")
    active: Mapped[bool] = mapped_column(Boolean, default=True)
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    last_login_at: Mapped[datetime | None] = mapped_column(DateTime)
    # Blinded review: this reviewer labels each case before seeing the model's output.
    blinded_review: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    # Part of every session's identity: raising it (sign-out, deactivation) ends all of
    # this user's sessions, whatever cookies are still around.
    session_version: Mapped[int] = mapped_column(Integer, default=0, server_default=text("0"))
    # Set when an admin creates the account or resets its password: the next sign-in leads
    # straight to the password change page, and nothing else opens until it is done.
    must_change_password: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())

    def set_password(self, password: str) -> None:
        self.password_hash = generate_password_hash(password)

    def check_password(self, password: str) -> bool:
        return check_password_hash(self.password_hash, password)

    @property
    def is_active(self) -> bool:  # Flask-Login refuses inactive users at login and per request
        return bool(self.active)

    def has_role(self, *roles: str) -> bool:
        return self.role in roles

    @property
    def sees_all_cases(self) -> bool:
        """Reviewers and admins read every case; clinicians only their own uploads."""
        return self.role in ("reviewer", "admin")

    def __repr__(self) -> str:
        return f"<User {self.email} {self.role}>"


class ModelVersion(db.Model):
    """A registered checkpoint. Exactly one (or none) is active: the one workers use."""

    __tablename__ = "model_version"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    file_key: Mapped[str] = mapped_column(String(255))  # key in the file store
    checksum: Mapped[str] = mapped_column(String(64), unique=True)  # sha256 of the file
    threshold: Mapped[float] = mapped_column(Float)
    input_size: Mapped[int | None] = mapped_column(Integer)
    metrics: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    meta: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)  # the checkpoint's meta
    notes: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    registered_by_id: Mapped[int | None] = mapped_column(ForeignKey("user.id"))
    is_active: Mapped[bool] = mapped_column(Boolean, default=False)
    activated_at: Mapped[datetime | None] = mapped_column(DateTime)
    # Lineage for retraining: which version this one was trained from, and on what data.
    parent_id: Mapped[int | None] = mapped_column(ForeignKey("model_version.id"))
    data_fingerprint: Mapped[str | None] = mapped_column(String(64))

    parent: Mapped[ModelVersion | None] = relationship(remote_side=[id])

    __table_args__ = (
        # The database itself guarantees at most one active version.
        Index("uq_model_version_one_active", "is_active", unique=True,
              sqlite_where=text("is_active = 1"), postgresql_where=text("is_active")),
    )

    def __repr__(self) -> str:
        return f"<ModelVersion {self.name}{' active' if self.is_active else ''}>"


class Case(db.Model):
    """One uploaded image and the state of its prediction job.

    `label` and `probability` copy the latest prediction so that the case list can filter
    and sort on indexed columns of one table (no join per row, no N+1).
    """

    __tablename__ = "case"
    id: Mapped[int] = mapped_column(primary_key=True)
    uploader_id: Mapped[int] = mapped_column(ForeignKey("user.id"))
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow, onupdate=utcnow)
    status: Mapped[str] = mapped_column(String(16), default="queued")
    error: Mapped[str | None] = mapped_column(Text)
    image_sha256: Mapped[str] = mapped_column(String(64), index=True)
    image_key: Mapped[str] = mapped_column(String(255))
    image_format: Mapped[str] = mapped_column(String(8))  # "PNG" or "JPEG", from the content
    original_filename: Mapped[str] = mapped_column(String(255))  # for display only
    width: Mapped[int] = mapped_column(Integer)
    height: Mapped[int] = mapped_column(Integer)
    note: Mapped[str | None] = mapped_column(Text)
    started_at: Mapped[datetime | None] = mapped_column(DateTime)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    # When the job was last handed to the broker; None while a queued case waits in the
    # outbox (the broker refused it) for the sweep to send it.
    dispatched_at: Mapped[datetime | None] = mapped_column(DateTime)
    label: Mapped[str | None] = mapped_column(String(16))
    probability: Mapped[float | None] = mapped_column(Float)
    # Maintained by the review feature; kept here so "unreviewed" is an indexed filter.
    review_count: Mapped[int] = mapped_column(Integer, default=0)
    # A mistaken upload taken back by its uploader or an admin: the row stays (reviews,
    # audit trail), but lists, the review queue and the feedback export leave it out.
    withdrawn_at: Mapped[datetime | None] = mapped_column(DateTime)
    withdrawn_by_id: Mapped[int | None] = mapped_column(ForeignKey("user.id"))
    # DICOM uploads (webapp/dicom.py): "DICOM" here, None for a PNG or JPEG upload; the
    # stored image is then the PNG derived from the de-identified file. `dicom_meta` holds
    # only whitelisted, non-identifying facts (modality, device, laterality, view, pixel
    # spacing, frames); `burned_in_annotation` is BurnedInAnnotation (YES True, NO False,
    # not stated None); `patient_key` is the per-site pseudonym, only with
    # DICOM_PATIENT_KEY_SECRET set.
    source_format: Mapped[str | None] = mapped_column(String(8))
    dicom_meta: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    burned_in_annotation: Mapped[bool | None] = mapped_column(Boolean)
    patient_key: Mapped[str | None] = mapped_column(String(64), index=True)

    uploader: Mapped[User] = relationship(foreign_keys=[uploader_id])
    withdrawn_by: Mapped[User | None] = relationship(foreign_keys=[withdrawn_by_id])
    predictions: Mapped[list[Prediction]] = relationship(
        back_populates="case", order_by="Prediction.updated_at.desc()", cascade="all, delete-orphan")

    __table_args__ = (
        # Keyset pagination: each list order has an index that ends in the primary key.
        Index("ix_case_created", "created_at", "id"),
        Index("ix_case_status_created", "status", "created_at", "id"),
        Index("ix_case_uploader_created", "uploader_id", "created_at", "id"),
        Index("ix_case_label_created", "label", "created_at", "id"),
        Index("ix_case_probability", "probability", "id"),
        Index("ix_case_reviews_created", "review_count", "created_at", "id"),
    )

    @property
    def latest_prediction(self) -> Prediction | None:
        return self.predictions[0] if self.predictions else None

    @property
    def is_finished(self) -> bool:
        return self.status in ("done", "failed")

    def __repr__(self) -> str:
        return f"<Case {self.id} {self.status}>"


class Prediction(db.Model):
    """What one model version said about one case. One row per (case, model version)."""

    __tablename__ = "prediction"
    id: Mapped[int] = mapped_column(primary_key=True)
    case_id: Mapped[int] = mapped_column(ForeignKey("case.id", ondelete="CASCADE"))
    model_version_id: Mapped[int] = mapped_column(ForeignKey("model_version.id"))
    probability: Mapped[float] = mapped_column(Float)
    label: Mapped[str] = mapped_column(String(16))
    threshold: Mapped[float] = mapped_column(Float)
    method: Mapped[str] = mapped_column(String(32))
    heatmap_key: Mapped[str | None] = mapped_column(String(255))
    overlay_key: Mapped[str | None] = mapped_column(String(255))
    faithfulness: Mapped[float | None] = mapped_column(Float)
    border_share: Mapped[float | None] = mapped_column(Float)
    timings: Mapped[dict[str, float]] = mapped_column(JSON, default=dict)
    # Three-class models: the most likely class (normal / benign / malignant) and each
    # class's probability; None for two-class models.
    predicted_class: Mapped[str | None] = mapped_column(String(16))
    class_probabilities: Mapped[dict[str, float] | None] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow, onupdate=utcnow)

    case: Mapped[Case] = relationship(back_populates="predictions")
    model_version: Mapped[ModelVersion] = relationship()

    __table_args__ = (UniqueConstraint("case_id", "model_version_id"),)


class SignInAttempt(db.Model):
    """One sign-in attempt, by the email as typed (known account or not) and the client
    address. Throttling counts failures per (email, address) and per address, so that
    nobody can lock an account for everyone from one address (docs/security.md)."""

    __tablename__ = "sign_in_attempt"
    id: Mapped[int] = mapped_column(primary_key=True)
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    email: Mapped[str] = mapped_column(String(254))
    address: Mapped[str] = mapped_column(String(64))
    succeeded: Mapped[bool] = mapped_column(Boolean, default=False)

    __table_args__ = (
        Index("ix_sign_in_attempt_email_address", "email", "address", "created_at"),
        Index("ix_sign_in_attempt_address", "address", "created_at"),
    )


class Heartbeat(db.Model):
    """The last time a component wrote to the database (`/healthz` proves writes work)."""

    __tablename__ = "heartbeat"
    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    beat_at: Mapped[datetime] = mapped_column(DateTime)


class AuditEvent(db.Model):
    """Who did what to which row, and when. Written in the same transaction as the change."""

    __tablename__ = "audit_event"
    id: Mapped[int] = mapped_column(primary_key=True)
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow, index=True)
    actor_id: Mapped[int | None] = mapped_column(ForeignKey("user.id"))  # None: the system
    action: Mapped[str] = mapped_column(String(64), index=True)
    target_type: Mapped[str | None] = mapped_column(String(32))
    target_id: Mapped[int | None] = mapped_column(Integer)
    details: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)

    actor: Mapped[User | None] = relationship()

    __table_args__ = (Index("ix_audit_event_target", "target_type", "target_id"),)


# Who runs `manage.py` (set once per command line): {"os_user": ..., "email": ... or None}.
_command_line_actor: ContextVar[dict[str, str | None] | None] = ContextVar("command_line_actor", default=None)


def set_command_line_actor(os_user: str | None, email: str | None = None) -> None:
    """Record that this process acts for ``os_user`` (and the account ``email``, if given):
    audit events written without a signed-in user name them instead of "system". ``None``
    (a long-running server or worker) leaves such events to "system"."""
    _command_line_actor.set(None if os_user is None else
                            {"os_user": os_user, "email": email.strip().lower() if email else None})


def audit(action: str, actor: User | None = None, target: db.Model | None = None, **details: Any) -> AuditEvent:
    """Add an audit event to the current session; the caller's commit writes it with the change.

    Without ``actor``, an event written by a `manage.py` command records the operating-system
    user (``details.os_user``) and the account given with ``--actor`` when it exists."""
    command_line = _command_line_actor.get()
    if actor is None and command_line is not None:
        details = {"via": "command line", "os_user": command_line["os_user"], **details}
        if command_line["email"]:
            actor = db.session.scalar(db.select(User).where(User.email == command_line["email"]))
            if actor is None:
                details["actor_unknown"] = command_line["email"]
    event = AuditEvent(
        action=action,
        actor_id=actor.id if actor is not None else None,
        target_type=target.__tablename__ if target is not None else None,
        target_id=target.id if target is not None else None,
        details=details,
    )
    db.session.add(event)
    return event


class Review(db.Model):
    """A reviewer's current reading of one case: one row per (case, reviewer).

    Every submitted version, including this one, is also kept in `ReviewRevision`.
    `verdict` is None while a blinded review has its blind label but is not yet
    confirmed; such a row is not a finished review (not counted, not exported).
    `label` is the reviewer's cancer/normal answer: the model's label when they agree.
    """

    __tablename__ = "review"
    id: Mapped[int] = mapped_column(primary_key=True)
    case_id: Mapped[int] = mapped_column(ForeignKey("case.id", ondelete="CASCADE"), index=True)
    reviewer_id: Mapped[int] = mapped_column(ForeignKey("user.id"), index=True)
    prediction_id: Mapped[int | None] = mapped_column(ForeignKey("prediction.id", ondelete="SET NULL"))
    # What the model said when the reviewer read it (the prediction row may later be re-run).
    model_version_id: Mapped[int | None] = mapped_column(ForeignKey("model_version.id"))
    model_label: Mapped[str | None] = mapped_column(String(16))
    model_probability: Mapped[float | None] = mapped_column(Float)
    verdict: Mapped[str | None] = mapped_column(String(16))
    label: Mapped[str | None] = mapped_column(String(16))
    detailed_label: Mapped[str | None] = mapped_column(String(16))
    confidence: Mapped[str | None] = mapped_column(String(16))
    comment: Mapped[str | None] = mapped_column(Text)
    reading_seconds: Mapped[float | None] = mapped_column(Float)
    blinded: Mapped[bool] = mapped_column(Boolean, default=False)
    blinded_label: Mapped[str | None] = mapped_column(String(16))
    blinded_confidence: Mapped[str | None] = mapped_column(String(16))
    blinded_seconds: Mapped[float | None] = mapped_column(Float)
    revision: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    submitted_at: Mapped[datetime | None] = mapped_column(DateTime, index=True)

    case: Mapped[Case] = relationship()
    reviewer: Mapped[User] = relationship()
    prediction: Mapped[Prediction | None] = relationship()
    model_version: Mapped[ModelVersion | None] = relationship()
    revisions: Mapped[list[ReviewRevision]] = relationship(
        back_populates="review", order_by="ReviewRevision.revision", cascade="all, delete-orphan")

    __table_args__ = (UniqueConstraint("case_id", "reviewer_id"),)

    @property
    def is_complete(self) -> bool:
        return self.verdict is not None


class ReviewRevision(db.Model):
    """One submitted version of a review, never changed afterwards (append-only history)."""

    __tablename__ = "review_revision"
    id: Mapped[int] = mapped_column(primary_key=True)
    review_id: Mapped[int] = mapped_column(ForeignKey("review.id", ondelete="CASCADE"))
    revision: Mapped[int] = mapped_column(Integer)
    stage: Mapped[str] = mapped_column(String(16))  # "blinded" (label only) or "final"
    verdict: Mapped[str | None] = mapped_column(String(16))
    label: Mapped[str | None] = mapped_column(String(16))
    detailed_label: Mapped[str | None] = mapped_column(String(16))
    confidence: Mapped[str | None] = mapped_column(String(16))
    comment: Mapped[str | None] = mapped_column(Text)
    reading_seconds: Mapped[float | None] = mapped_column(Float)
    model_version_id: Mapped[int | None] = mapped_column(ForeignKey("model_version.id"))
    model_label: Mapped[str | None] = mapped_column(String(16))
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)

    review: Mapped[Review] = relationship(back_populates="revisions")

    __table_args__ = (UniqueConstraint("review_id", "revision"),)


class ApiToken(db.Model):
    """A bearer token for the JSON API, acting as one user (with that user's role).

    Only the sha256 of the secret is stored: the secret is shown once, at creation.
    `prefix` (the secret's first characters) lets people tell their tokens apart.
    """

    __tablename__ = "api_token"
    id: Mapped[int] = mapped_column(primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("user.id"), index=True)
    name: Mapped[str] = mapped_column(String(100))
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    prefix: Mapped[str] = mapped_column(String(16))
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    created_by_id: Mapped[int | None] = mapped_column(ForeignKey("user.id"))
    expires_at: Mapped[datetime | None] = mapped_column(DateTime)
    last_used_at: Mapped[datetime | None] = mapped_column(DateTime)
    revoked_at: Mapped[datetime | None] = mapped_column(DateTime)

    user: Mapped[User] = relationship(foreign_keys=[user_id])

    def __repr__(self) -> str:
        return f"<ApiToken {self.id} {self.prefix}… {'revoked' if self.revoked_at else 'live'}>"
