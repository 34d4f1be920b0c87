"""Key resolution and key files: sources, their priority, masking, file modes."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from vespa import keys

ACCOUNT = "acct-0123456789abcdef-AAAA"
ENDPOINT = "ep-fedcba9876543210-BBBB"


@pytest.fixture
def home(tmp_path: Path) -> Path:
    (tmp_path / "home").mkdir()
    return tmp_path / "home"


def write_key(path: Path, value: str, mode: int = 0o600) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(value)
    path.chmod(mode)
    return path


def test_mask_shows_only_the_last_four() -> None:
    assert keys.mask(ACCOUNT) == "...AAAA"
    assert ACCOUNT[:-4] not in keys.mask(ACCOUNT)
    # A short key would be given away by its last four characters.
    assert keys.mask("abcdef") == "...."


def test_secret_repr_hides_the_value() -> None:
    secret = keys.Secret(ACCOUNT, "env VAST_ACCOUNT_KEY", keys.ENV)
    assert ACCOUNT not in repr(secret)
    assert secret.describe() == "env VAST_ACCOUNT_KEY (...AAAA)"


def test_nothing_anywhere(home: Path) -> None:
    r = keys.resolve(env={}, home=home)
    assert (r.account_key, r.endpoint_key, r.endpoint, r.warnings) == (None, None, None, [])


def test_flags_beat_env_beat_files(home: Path, tmp_path: Path) -> None:
    xdg = tmp_path / "xdg"
    write_key(xdg / "vastai" / "vast_api_key", "from-xdg-file-1234")
    env = {"XDG_CONFIG_HOME": str(xdg), "VAST_ACCOUNT_KEY": "from-env-account-5678",
           "VAST_API_KEY": "from-env-endpoint-9999", "VAST_ENDPOINT": "env-endpoint"}

    r = keys.resolve(account_key="flag-account-key-0000", api_key="flag-endpoint-key-1111",
                     endpoint="flag-endpoint", env=env, home=home)
    assert (r.account_key.value, r.account_key.source) == ("flag-account-key-0000", "--account-key")
    assert (r.endpoint_key.value, r.endpoint_key.source) == ("flag-endpoint-key-1111", "--api-key")
    assert (r.endpoint.value, r.endpoint.source) == ("flag-endpoint", "--endpoint")

    r = keys.resolve(env=env, home=home)
    assert (r.account_key.value, r.account_key.source) == ("from-env-account-5678", "env VAST_ACCOUNT_KEY")
    assert (r.endpoint_key.value, r.endpoint_key.source) == ("from-env-endpoint-9999", "env VAST_API_KEY")
    assert (r.endpoint.value, r.endpoint.source) == ("env-endpoint", "env VAST_ENDPOINT")

    r = keys.resolve(env={"XDG_CONFIG_HOME": str(xdg)}, home=home)
    assert r.account_key.value == "from-xdg-file-1234"
    assert r.account_key.path == xdg / "vastai" / "vast_api_key"
    assert r.endpoint_key is None and r.endpoint is None


def test_key_files_in_the_vastai_cli_order(home: Path) -> None:
    legacy = write_key(home / ".vast_api_key", "  legacy-key-abcd\n")
    r = keys.resolve(env={}, home=home)
    assert (r.account_key.value, r.account_key.source) == ("legacy-key-abcd", "file ~/.vast_api_key")

    write_key(home / ".config" / "vastai" / "vast_api_key", "config-key-efgh\n")
    r = keys.resolve(env={}, home=home)
    assert (r.account_key.value, r.account_key.source) == ("config-key-efgh", "file ~/.config/vastai/vast_api_key")

    # XDG_CONFIG_HOME replaces ~/.config: with nothing there, the legacy file is next.
    r = keys.resolve(env={"XDG_CONFIG_HOME": str(home / "elsewhere")}, home=home)
    assert r.account_key.path == legacy


def test_empty_values_do_not_count(home: Path) -> None:
    write_key(home / ".vast_api_key", "file-key-wxyz")
    write_key(home / ".config" / "vastai" / "vast_api_key", "\n")
    r = keys.resolve(account_key="  ", env={"VAST_ACCOUNT_KEY": ""}, home=home)
    assert r.account_key.value == "file-key-wxyz"
    assert any("empty" in w for w in r.warnings)


def test_warns_when_a_key_file_is_readable_by_others(home: Path) -> None:
    write_key(home / ".vast_api_key", "file-key-wxyz", mode=0o644)
    r = keys.resolve(env={}, home=home)
    assert r.account_key.value == "file-key-wxyz"
    assert len(r.warnings) == 1 and "chmod 600" in r.warnings[0] and "644" in r.warnings[0]
    assert "file-key-wxyz" not in r.warnings[0]

    (home / ".vast_api_key").chmod(0o600)
    assert keys.resolve(env={}, home=home).warnings == []


@pytest.mark.parametrize(
    "account_rank, endpoint_rank, expected",
    [(None, keys.ENV, True), (keys.FILE, keys.ENV, True), (keys.ENV, keys.ENV, True),
     (keys.FLAG, keys.ENV, False), (keys.ENV, None, False)],
)
def test_the_stronger_source_decides_the_key_type(account_rank, endpoint_rank, expected) -> None:
    def secret(rank):
        return None if rank is None else keys.Secret("k" * 16, "x", rank)

    r = keys.Resolved(secret(account_rank), secret(endpoint_rank), keys.Named("ep", "--endpoint"), [])
    assert r.prefers_endpoint_key() is expected


def test_default_key_file_is_the_xdg_one(home: Path) -> None:
    assert keys.default_key_file({}, home) == home / ".config" / "vastai" / "vast_api_key"
    assert keys.default_key_file({"XDG_CONFIG_HOME": "/x"}, home) == Path("/x/vastai/vast_api_key")


def test_save_key_file_is_0600_from_the_first_byte(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = home / ".config" / "vastai" / "vast_api_key"
    seen_modes: list[int] = []
    real_replace = os.replace

    def spy_replace(src, dst):
        seen_modes.append(stat.S_IMODE(os.stat(src).st_mode))
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", spy_replace)
    old_umask = os.umask(0)  # the most permissive umask must not matter
    try:
        keys.save_key_file(" new-account-key-1234 \n", path)
    finally:
        os.umask(old_umask)
    assert seen_modes == [0o600]
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert path.read_text() == "new-account-key-1234\n"
    assert os.listdir(path.parent) == ["vast_api_key"]


def test_save_key_file_replaces_a_loose_file(home: Path) -> None:
    path = write_key(home / "vastai" / "vast_api_key", "old", mode=0o644)
    keys.save_key_file("replacement-key-5678", path)
    assert path.read_text() == "replacement-key-5678\n"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert keys.read_key_file(path, home)[1] == []
