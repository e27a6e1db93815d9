"""Every DEMANDSTREAM_* name in deploy/ and docs/OPERATIONS.md is a setting the worker reads."""

from __future__ import annotations

import pytest
from deploy_spec import DEPLOY, DOCUMENTED_ENV_VARS, K8S_DIR, REPO, code_env_vars, env_names_in_text

OPERATIONS = REPO / "docs" / "OPERATIONS.md"
FILES_SETTING_ENV = (
    DEPLOY / "Dockerfile",
    DEPLOY / "docker-compose.yml",
    K8S_DIR / "configmap.yaml",
    K8S_DIR / "statefulset.yaml",
)
# Comments count too: a stale name in a comment misleads an operator as much as one in a setting.
FILES_MENTIONING_ENV = tuple(dict.fromkeys((*FILES_SETTING_ENV, *sorted(K8S_DIR.glob("*.yaml")), OPERATIONS)))

NO_SETTINGS_MODULE = "demandstream.stream.settings.ENV_VARS is not importable yet (the lead provides it)"


def _names(path) -> set[str]:
    return env_names_in_text(path.read_text(encoding="utf-8"))


def test_deploy_files_set_settings() -> None:
    for path in FILES_SETTING_ENV:
        assert _names(path), path


@pytest.mark.parametrize("path", FILES_MENTIONING_ENV, ids=lambda path: str(path.relative_to(REPO)))
def test_names_are_read_by_the_code(path) -> None:
    code = code_env_vars()
    if code is None:
        pytest.skip(NO_SETTINGS_MODULE)
    assert _names(path) <= code, f"the worker never reads {sorted(_names(path) - code)}"


@pytest.mark.parametrize("path", FILES_SETTING_ENV, ids=lambda path: str(path.relative_to(REPO)))
def test_deploy_names_are_documented_settings(path) -> None:
    # Holds without stream/: catches a typo even before the settings module exists.
    assert _names(path) <= DOCUMENTED_ENV_VARS, sorted(_names(path) - DOCUMENTED_ENV_VARS)


def test_operations_guide_lists_every_setting() -> None:
    code = code_env_vars()
    assert _names(OPERATIONS) >= (code or DOCUMENTED_ENV_VARS)


def test_code_reads_at_least_the_documented_settings() -> None:
    code = code_env_vars()
    if code is None:
        pytest.skip(NO_SETTINGS_MODULE)
    assert DOCUMENTED_ENV_VARS <= code, sorted(DOCUMENTED_ENV_VARS - code)
