"""Key resolution and key files: sources, their priority, masking, file modes."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from vespa import keys
from vespa.errors import BadKey

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


# --- malformed keys: refused where they enter, naming the source, never showing the key -----------
SECRET = "SECRETMARKER0123456789abcdef"
MALFORMED = {
    "two lines": (f"{SECRET}\nsecond-line", "has 2 lines; a key is one line"),
    "comment line": (f"# my vast key\n{SECRET}\n", "line 1 is a comment"),
    "windows line ends": (f"{SECRET}\r\nmore\r\n", "has 2 lines"),
    "BOM": (f"\ufeff{SECRET}\n", "byte-order mark"),
    "no-break space": (f"{SECRET[:10]}\u00a0{SECRET[10:]}", "U+00A0 (NO-BREAK SPACE) at character 11 of 29"),
    "zero-width space": (f"{SECRET}\u200b", "U+200B (ZERO WIDTH SPACE)"),
    "non-latin-1": (f"{SECRET}\u2019", "U+2019"),
    "inner space": (f"Bearer {SECRET}", "U+0020 (SPACE) at character 7"),
    "control character": (f"{SECRET}\x07", "U+0007 (a control character)"),
    "too long": (SECRET * 40, "is 1120 characters long; a key is at most 1024"),
}


def assert_hides(exc: Exception) -> None:
    text = f"{exc} {exc.message} {exc.hint} {exc.body()!r} {exc!r}"
    assert "SECRETMARKER" not in text and "0123456789" not in text and "second-line" not in text


@pytest.mark.parametrize("case", list(MALFORMED))
def test_clean_key_refuses_malformed_values_without_showing_them(case: str) -> None:
    value, expected = MALFORMED[case]
    with pytest.raises(BadKey) as info:
        keys.clean_key(value, "env VAST_API_KEY", kind="endpoint key")
    exc = info.value
    assert exc.message.startswith("the endpoint key from env VAST_API_KEY "), exc.message
    assert expected in exc.message
    assert "VAST_API_KEY" in exc.hint
    assert (exc.status, exc.type) == (503, "bad_key")
    assert_hides(exc)


def test_clean_key_strips_as_the_vastai_cli_does() -> None:
    # vastai's CLI and SDK read key files with `open(path).read().strip()` (vastai/cli/main.py,
    # vastai/_base.py): surrounding whitespace goes, nothing else is interpreted.
    assert keys.clean_key(f"  \t{SECRET}\r\n\n", "--api-key") == SECRET
    assert keys.clean_key("a!~z", "--api-key") == "a!~z"  # every printable ASCII character is fine
    with pytest.raises(BadKey, match="is empty"):
        keys.clean_key(" \n", "--api-key")


def test_the_hint_follows_the_source() -> None:
    value = f"{SECRET}\nx"
    hints = {}
    for source in ("--account-key", "env VAST_ACCOUNT_KEY", "file /srv/keys/vast_api_key", "the prompt",
                   "the console's answer for endpoint 'e'"):
        with pytest.raises(BadKey) as info:
            keys.clean_key(value, source)
        assert info.value.message.startswith(f"the key from {source} has 2 lines")
        hints[source] = info.value.hint
    assert "after --account-key" in hints["--account-key"]
    assert "export VAST_ACCOUNT_KEY=" in hints["env VAST_ACCOUNT_KEY"]
    assert "in /srv/keys/vast_api_key" in hints["file /srv/keys/vast_api_key"]
    assert "vastai set api-key" in hints["file /srv/keys/vast_api_key"]
    assert "Vast's side" in hints["the console's answer for endpoint 'e'"]


@pytest.mark.parametrize("case", ["comment line", "BOM", "two lines", "non-latin-1"])
def test_a_malformed_key_file_is_refused_naming_its_path(home: Path, tmp_path: Path, case: str) -> None:
    xdg = tmp_path / "xdg"  # outside HOME: the message gives the path in full
    path = xdg / "vastai" / "vast_api_key"
    path.parent.mkdir(parents=True)
    path.write_bytes(MALFORMED[case][0].encode("utf-8"))
    write_key(home / ".vast_api_key", "legacy-key-is-not-a-fallback")
    with pytest.raises(BadKey) as info:
        keys.resolve(env={"XDG_CONFIG_HOME": str(xdg)}, home=home)
    exc = info.value
    assert exc.message.startswith(f"the account key from file {path} "), exc.message
    assert MALFORMED[case][1] in exc.message
    assert str(path) in exc.hint
    assert_hides(exc)


def test_a_key_file_that_is_not_utf8_is_refused(home: Path) -> None:
    path = home / ".vast_api_key"
    path.write_bytes(SECRET.encode() + b"\xff\xfe\n")
    with pytest.raises(BadKey) as info:
        keys.resolve(env={}, home=home)
    assert info.value.message == "the account key from file ~/.vast_api_key is not UTF-8 text (byte 29 of 31)"
    assert_hides(info.value)


def test_a_huge_key_file_is_not_read_whole(home: Path) -> None:
    (home / ".vast_api_key").write_bytes(b"x" * (10 * 1024 * 1024))
    with pytest.raises(BadKey, match="is over 64 KiB"):
        keys.resolve(env={}, home=home)


def test_a_clean_key_file_reads_as_the_cli_reads_it(home: Path) -> None:
    path = write_key(home / ".vast_api_key", f"\n  {SECRET}  \n\n")
    assert keys.resolve(env={}, home=home).account_key.value == path.read_text().strip() == SECRET


@pytest.mark.parametrize(
    "kwargs, env, source",
    [({"account_key": f"{SECRET}\n#"}, {}, "--account-key"), ({"api_key": f"{SECRET} x"}, {}, "--api-key"),
     ({}, {"VAST_ACCOUNT_KEY": f"\ufeff{SECRET}"}, "env VAST_ACCOUNT_KEY"),
     ({}, {"VAST_API_KEY": f"{SECRET}\nline2"}, "env VAST_API_KEY")],
)
def test_malformed_flags_and_env_are_refused(home: Path, kwargs: dict, env: dict, source: str) -> None:
    with pytest.raises(BadKey) as info:
        keys.resolve(env=env, home=home, **kwargs)
    kind = "endpoint key" if "API" in source.upper() and "ACCOUNT" not in source.upper() else "account key"
    assert info.value.message.startswith(f"the {kind} from {source} ")
    assert_hides(info.value)
