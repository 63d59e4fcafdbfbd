"""manage.py init / users / models register, through the real click group."""
from __future__ import annotations

import pytest
from click.testing import CliRunner

import manage


@pytest.fixture
def run_cli(tmp_path, monkeypatch):
    monkeypatch.setenv("INSTANCE_PATH", str(tmp_path / "instance"))
    for name in ("DATABASE_URL", "ADMIN_EMAIL", "ADMIN_PASSWORD", "STORAGE_DIR", "CELERY_BROKER_URL"):
        monkeypatch.delenv(name, raising=False)
    runner = CliRunner()

    def run(*args, input=None, env=None):
        return runner.invoke(manage.cli, list(args), input=input, env=env, catch_exceptions=False)

    return run


def test_init_creates_schema_and_first_admin_from_env_then_is_idempotent(run_cli):
    result = run_cli("init", env={"ADMIN_EMAIL": "boss@example.org", "ADMIN_PASSWORD": "a-long-quiet-secret"})
    assert result.exit_code == 0, result.output
    assert "created admin boss@example.org" in result.output and "a-long-quiet-secret" not in result.output
    again = run_cli("init")
    assert again.exit_code == 0 and "an admin account exists" in again.output
    listing = run_cli("users", "list").output
    assert "boss@example.org" in listing and "admin" in listing


def test_init_prompts_for_the_password(run_cli):
    result = run_cli("init", "--admin-email", "boss@example.org", input="a-long-quiet-secret\na-long-quiet-secret\n")
    assert result.exit_code == 0, result.output
    assert "created admin boss@example.org" in result.output


def test_users_create_set_role_deactivate(run_cli):
    run_cli("init", env={"ADMIN_EMAIL": "boss@example.org", "ADMIN_PASSWORD": "a-long-quiet-secret"})
    assert run_cli("users", "create", "doc@example.org", "--password-stdin", input="doc-lantern-orbit-1\n").exit_code == 0
    short = run_cli("users", "create", "x@example.org", "--password-stdin", input="short\n")
    assert short.exit_code == 1 and "at least 12 characters" in short.output
    assert "doc@example.org is now reviewer" in run_cli("users", "set-role", "doc@example.org", "reviewer").output
    assert "deactivated" in run_cli("users", "deactivate", "doc@example.org").output
    line = next(l for l in run_cli("users", "list").output.splitlines() if l.startswith("doc@"))
    assert line.split()[1:3] == ["reviewer", "inactive"]
    last = run_cli("users", "set-role", "boss@example.org", "clinician")
    assert last.exit_code == 1 and "last active admin" in last.output
    missing = run_cli("users", "deactivate", "nobody@example.org")
    assert missing.exit_code == 1 and "no user with email" in missing.output


def test_models_register(run_cli, tiny_checkpoint, tmp_path):
    run_cli("init", env={"ADMIN_EMAIL": "boss@example.org", "ADMIN_PASSWORD": "a-long-quiet-secret"})
    result = run_cli("models", "register", str(tiny_checkpoint))
    assert result.exit_code == 0, result.output
    assert "registered v1 (active; threshold 0.500, input 32 px" in result.output
    again = run_cli("models", "register", str(tiny_checkpoint))
    assert again.exit_code == 1 and "already registered as version v1" in again.output
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"definitely not a checkpoint")
    bad = run_cli("models", "register", str(junk))
    assert bad.exit_code == 1 and "not registered:" in bad.output


def test_worker_without_a_broker_explains_what_to_do(run_cli):
    run_cli("init", env={"ADMIN_EMAIL": "boss@example.org", "ADMIN_PASSWORD": "a-long-quiet-secret"})
    result = run_cli("worker")
    assert result.exit_code == 1
    assert "no broker" in result.output and "manage.py run" in result.output
