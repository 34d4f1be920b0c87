"""Where the keys come from: flags, then the environment, then the vastai CLI's key files.

Two kinds of key exist and are easy to confuse: the account key (console.vast.ai/account,
lists endpoints and hands out their keys) and the per-endpoint key (what /route/ accepts).
Key files hold the account key, as the vastai CLI writes them.

Every key is checked once, where it enters (`clean_key`): it goes into an HTTP header, so a
second line, a byte-order mark or a non-ASCII character would otherwise surface much later as an
`InvalidHeader` or `UnicodeEncodeError` whose message (and traceback) holds the key itself.
"""

from __future__ import annotations

import os
import re
import stat
import tempfile
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

from vespa.errors import BadKey

ACCOUNT_ENV = "VAST_ACCOUNT_KEY"
ENDPOINT_ENV = "VAST_ENDPOINT"
# As in the user's brief, VAST_API_KEY is the *endpoint* key here (the vastai CLI reads it as
# the account key); the launcher's hints say so when the autoscaler rejects it.
ENDPOINT_KEY_ENV = "VAST_API_KEY"

# Far above any real key (Vast's are 64 hex digits), far below a header limit.
MAX_KEY_CHARS = 1024
# A key file larger than this is not a key file; read no further.
MAX_KEY_FILE_BYTES = 64 * 1024
BOM = "\ufeff"

# Lower is stronger: a key from a flag beats one from the environment, which beats a file.
# A key typed at the prompt counts as a flag.
FLAG, ENV, FILE = 0, 1, 2


def mask(key: str) -> str:
    """Enough to tell keys apart, never enough to use one: short keys show nothing."""
    return f"...{key[-4:]}" if len(key) >= 12 else "...."


def clean_key(value: str, source: str, *, kind: str = "key") -> str:
    """`value` stripped, as the vastai CLI strips it, or BadKey naming `source` and the problem.

    A key is one line of printable ASCII without spaces. The message never shows any part of the
    value: `clean_key(os.environ["VAST_API_KEY"], "env VAST_API_KEY", kind="endpoint key")` on a
    two-line value raises "the endpoint key from env VAST_API_KEY has 2 lines; ...". `source`
    reads "--api-key", "env VAR", "file PATH" or anything else ("the prompt"); the hint follows it.
    """
    what = f"the {kind} from {source}"
    if not isinstance(value, str):
        raise BadKey(f"{what} is not text ({type(value).__name__})", _fix_hint(source))
    key = value.strip()
    if key.startswith(BOM):
        raise BadKey(
            f"{what} starts with a byte-order mark (U+FEFF, an editor's 'UTF-8 with BOM')",
            _fix_hint(source, "Save it as plain text without a BOM; the vastai CLI cannot use it either. "),
        )
    if not key:
        raise BadKey(f"{what} is empty", _fix_hint(source))
    lines = re.split(r"\r\n|\r|\n", key)
    if len(lines) > 1:
        comments = [i for i, line in enumerate(lines, 1) if line.lstrip().startswith("#")]
        note = ""
        if comments:
            note = (f" (line {comments[0]} is a comment: the vastai CLI reads no comments, it sends the "
                    "whole file as the key)")
        raise BadKey(f"{what} has {len(lines)} lines; a key is one line{note}", _fix_hint(source))
    if len(key) > MAX_KEY_CHARS:
        raise BadKey(f"{what} is {len(key)} characters long; a key is at most {MAX_KEY_CHARS}", _fix_hint(source))
    for i, ch in enumerate(key, 1):
        if not "!" <= ch <= "~":
            # The offending character is never part of a usable key, so naming it gives nothing away;
            # it is what the user needs to find a no-break space or zero-width space pasted from a page.
            name = unicodedata.name(ch, "a control character")
            raise BadKey(
                f"{what} has U+{ord(ch):04X} ({name}) at character {i} of {len(key)}; "
                "a key is printable ASCII without spaces",
                _fix_hint(source),
            )
    return key


def _fix_hint(source: str, first: str = "") -> str:
    """Where to fix it, following the source's own spelling."""
    if source.startswith("file "):
        path = source[len("file "):]
        return (f"{first}Keep only the key, on one line, in {path} (the vastai CLI sends the whole file, "
                "stripped, as the key); `vastai set api-key KEY` rewrites it.")
    if source.startswith("env "):
        var = source[len("env "):]
        return f"{first}Set {var} to the key alone, copied again from the Vast console, e.g. export {var}='KEY'."
    if source.startswith("the console"):
        return (f"{first}This is on Vast's side: retry in a minute, or pass the endpoint key yourself with "
                "--api-key (or env VAST_API_KEY).")
    if source.startswith("--"):
        return f"{first}Pass the key alone after {source}, copied again from the Vast console."
    return f"{first}Give the key alone, on one line, exactly as the Vast console shows it."


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
    """The file as the vastai CLI reads it (whole, stripped); BadKey when that is not one key."""
    try:
        with path.open("rb") as f:
            data = f.read(MAX_KEY_FILE_BYTES + 1)
        mode = path.stat().st_mode
    except (FileNotFoundError, NotADirectoryError):
        return None, []
    except OSError as exc:
        return None, [f"cannot read {_pretty(path, home)}: {exc.strerror}"]
    source = f"file {_pretty(path, home)}"
    if len(data) > MAX_KEY_FILE_BYTES:
        raise BadKey(
            f"the account key from {source} is over {MAX_KEY_FILE_BYTES // 1024} KiB; a key file holds one key",
            _fix_hint(source),
        )
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise BadKey(
            f"the account key from {source} is not UTF-8 text (byte {exc.start + 1} of {len(data)})",
            _fix_hint(source),
        ) from None
    if not text.strip():
        return None, [f"{_pretty(path, home)} is empty; ignored"]
    value = clean_key(text, source, kind="account key")
    warnings = []
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        warnings.append(
            f"{_pretty(path, home)} is readable by other users (mode {stat.S_IMODE(mode):o}); "
            f"fix it with: chmod 600 {path}"
        )
    return Secret(value, source, FILE, path), warnings


def _from_flag_or_env(
    flag: str | None, flag_name: str, env: Mapping[str, str], var: str, kind: str
) -> Secret | None:
    """Blank means not given; anything else must be a clean key."""
    if flag and flag.strip():
        return Secret(clean_key(flag, flag_name, kind=kind), flag_name, FLAG)
    if env.get(var, "").strip():
        return Secret(clean_key(env[var], f"env {var}", kind=kind), f"env {var}", ENV)
    return None


def resolve(
    *,
    account_key: str | None = None,
    api_key: str | None = None,
    endpoint: str | None = None,
    env: Mapping[str, str] | None = None,
    home: Path | None = None,
) -> Resolved:
    """Resolve every key and the endpoint name; each remembers where it came from.

    Raises BadKey for a malformed key from any source consulted: a broken key file is reported,
    not skipped for the next one (the vastai CLI would send it as it is).
    """
    env = os.environ if env is None else env
    home = Path.home() if home is None else home
    warnings: list[str] = []
    account = _from_flag_or_env(account_key, "--account-key", env, ACCOUNT_ENV, "account key")
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
    endpoint_key = _from_flag_or_env(api_key, "--api-key", env, ENDPOINT_KEY_ENV, "endpoint key")
    return Resolved(account, endpoint_key, name, warnings)


def shown_path(path: Path, home: Path | None = None) -> str:
    """A path as hints show it: under ~ when it is in the home directory, else in full."""
    return _pretty(path, Path.home() if home is None else home)


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
