"""Where the keys come from: flags, then the environment, then the vastai CLI's key files.

Two kinds of key exist and are easy to confuse: the account key (console.vast.ai/account,
lists endpoints and hands out their keys) and the per-endpoint key (what /route/ accepts).
Key files hold the account key, as the vastai CLI writes them.
"""

from __future__ import annotations

import os
import stat
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

ACCOUNT_ENV = "VAST_ACCOUNT_KEY"
ENDPOINT_ENV = "VAST_ENDPOINT"
# As in the user's brief, VAST_API_KEY is the *endpoint* key here (the vastai CLI reads it as
# the account key); the launcher's hints say so when the autoscaler rejects it.
ENDPOINT_KEY_ENV = "VAST_API_KEY"

# Lower is stronger: a key from a flag beats one from the environment, which beats a file.
# A key typed at the prompt counts as a flag.
FLAG, ENV, FILE = 0, 1, 2


def mask(key: str) -> str:
    """Enough to tell keys apart, never enough to use one: short keys show nothing."""
    return f"...{key[-4:]}" if len(key) >= 12 else "...."


@dataclass(frozen=True)
class Secret:
    value: str = field(repr=False)
    source: str  # e.g. "env VAST_ACCOUNT_KEY", "file ~/.vast_api_key"
    rank: int
    path: Path | None = None  # set when the key came from a file

    def describe(self) -> str:
        return f"{self.source} ({mask(self.value)})"


@dataclass(frozen=True)
class Named:
    value: str
    source: str


@dataclass
class Resolved:
    account_key: Secret | None
    endpoint_key: Secret | None
    endpoint: Named | None
    warnings: list[str]

    def prefers_endpoint_key(self) -> bool:
        """Use the endpoint key as is when it is at least as strong a source as the account key."""
        if self.endpoint_key is None:
            return False
        return self.account_key is None or self.endpoint_key.rank <= self.account_key.rank


def _pretty(path: Path, home: Path) -> str:
    try:
        return "~/" + str(path.relative_to(home))
    except ValueError:
        return str(path)


def key_file_paths(env: Mapping[str, str], home: Path) -> list[Path]:
    """The vastai CLI's order: the XDG file, then the legacy dotfile."""
    config = Path(env["XDG_CONFIG_HOME"]) if env.get("XDG_CONFIG_HOME") else home / ".config"
    return [config / "vastai" / "vast_api_key", home / ".vast_api_key"]


def read_key_file(path: Path, home: Path) -> tuple[Secret | None, list[str]]:
    try:
        value = path.read_text().strip()
        mode = path.stat().st_mode
    except (FileNotFoundError, NotADirectoryError):
        return None, []
    except OSError as exc:
        return None, [f"cannot read {_pretty(path, home)}: {exc.strerror}"]
    if not value:
        return None, [f"{_pretty(path, home)} is empty; ignored"]
    warnings = []
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        warnings.append(
            f"{_pretty(path, home)} is readable by other users (mode {stat.S_IMODE(mode):o}); "
            f"fix it with: chmod 600 {path}"
        )
    return Secret(value, f"file {_pretty(path, home)}", FILE, path), warnings


def _from_flag_or_env(flag: str | None, flag_name: str, env: Mapping[str, str], var: str) -> Secret | None:
    if flag and flag.strip():
        return Secret(flag.strip(), flag_name, FLAG)
    if env.get(var, "").strip():
        return Secret(env[var].strip(), f"env {var}", ENV)
    return None


def resolve(
    *,
    account_key: str | None = None,
    api_key: str | None = None,
    endpoint: str | None = None,
    env: Mapping[str, str] | None = None,
    home: Path | None = None,
) -> Resolved:
    """Resolve every key and the endpoint name; each remembers where it came from."""
    env = os.environ if env is None else env
    home = Path.home() if home is None else home
    warnings: list[str] = []
    account = _from_flag_or_env(account_key, "--account-key", env, ACCOUNT_ENV)
    if account is None:
        for path in key_file_paths(env, home):
            account, problems = read_key_file(path, home)
            warnings += problems
            if account is not None:
                break
    name = None
    if endpoint and endpoint.strip():
        name = Named(endpoint.strip(), "--endpoint")
    elif env.get(ENDPOINT_ENV, "").strip():
        name = Named(env[ENDPOINT_ENV].strip(), f"env {ENDPOINT_ENV}")
    return Resolved(account, _from_flag_or_env(api_key, "--api-key", env, ENDPOINT_KEY_ENV), name, warnings)


def default_key_file(env: Mapping[str, str] | None = None, home: Path | None = None) -> Path:
    """Where `vastai set api-key` writes: the XDG file."""
    return key_file_paths(os.environ if env is None else env, Path.home() if home is None else home)[0]


def save_key_file(key: str, path: Path) -> None:
    """Write atomically, and 0600 from the first byte: the temp file is created with that mode."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    # mkstemp creates the file O_EXCL with mode 0600 whatever the umask.
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(key.strip() + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
