"""Several endpoints behind one proxy: the catalog, its config file, and choosing per request.

Pure logic (no mitmproxy, no network): the launcher and the addon build a `Catalog` with
`load_config`, `from_names` or `from_json`, and ask `choose` / `workload` / `models_list`
about each request.

The config file (`--config FILE`) is TOML, one `[[endpoint]]` table per endpoint, in order:

```toml
[[endpoint]]
name = "llama-70b"
aliases = ["meta-llama/Llama-3.3-70B-Instruct", "big"]   # model names that select it
cost = "auto"            # or a number; default 1.0 as today
fallback = ["llama-8b"]  # tried in order when no worker is ready in time
fallback_after_s = 30
api_key_env = "VAST_KEY_LLAMA70B"   # optional: the endpoint key from this variable

[[endpoint]]
name = "llama-8b"
```

Keys of an `[[endpoint]]` table (only `name` is required):

- `name`: the Vast endpoint's name (a non-empty string). A request's `model` equal to it
  selects the endpoint, as does the header `X-Vast-Endpoint: NAME`.
- `aliases`: more model names that select it. A name or alias selects one endpoint only.
- `cost`: workload units sent to the autoscaler per request: a positive number (default 1.0)
  or `"auto"`, which takes `max_tokens` (and its kin, see `workload`) from the body. The
  request's `X-Serverless-Cost` header always wins.
- `fallback`: other endpoints' names, tried in order when this one has no worker ready
  within `fallback_after_s` seconds (default 30, may be 0). Only the chosen endpoint's own
  list is tried, never a fallback's fallbacks, so two endpoints may fall back on each other.
- `api_key_env`: the environment variable holding this endpoint's key (a variable name,
  never the key itself: the file is meant to be shareable).

A bad file is refused whole, with the file, the line when it can be found, the endpoint
(its number and name), the key, and a hint. Messages never repeat a value that could be a
key (`api_key_env`, unknown keys).
"""

from __future__ import annotations

import difflib
import json
import math
import re
import tomllib
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator, Literal, Mapping, Union

from vespa import wire
from vespa.errors import BadConfig, ModelNotFound, UnknownEndpoint

HEADER = "X-Vast-Endpoint"
AUTO: Literal["auto"] = "auto"
DEFAULT_COST = 1.0
DEFAULT_FALLBACK_AFTER_S = 30.0
# Where `cost = "auto"` looks in the body, in order; the last is TGI's nested form.
WORKLOAD_FIELDS: tuple[tuple[str, ...], ...] = (
    ("max_tokens",), ("max_completion_tokens",), ("max_new_tokens",), ("parameters", "max_new_tokens"),
)

Cost = Union[float, Literal["auto"]]

KEYS = ("name", "aliases", "cost", "fallback", "fallback_after_s", "api_key_env")
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
# A Vast key is long lowercase hex: such a "variable name" is a pasted key, to refuse unechoed.
_LOOKS_LIKE_KEY = re.compile(r"[0-9a-f]{32,}")
_EXAMPLE = 'e.g. a line [[endpoint]] followed by name = "llama-8b" (the README has a full example).'


class _Problem(BadConfig):
    """One bad key, before the caller knows where it sits (file, line, endpoint number)."""

    def __init__(self, key: str | None, problem: str, hint: str, index: int | None = None) -> None:
        super().__init__(f"key '{key}': {problem}" if key else problem, hint)
        self.key, self.problem, self.index = key, problem, index


# --- the catalog ------------------------------------------------------------------------------
@dataclass(frozen=True)
class EndpointSpec:
    """One endpoint as configured; holds no key, so it may travel to other processes and logs."""

    name: str
    aliases: tuple[str, ...] = ()
    cost: Cost = DEFAULT_COST
    fallback: tuple[str, ...] = ()
    fallback_after_s: float = DEFAULT_FALLBACK_AFTER_S
    api_key_env: str | None = None

    def __post_init__(self) -> None:
        # Normalise in place (lists -> tuples, ints -> floats) so equal configs compare equal.
        set_ = object.__setattr__
        set_(self, "name", _check_name(self.name, "name"))
        set_(self, "aliases", _check_names(self.aliases, "aliases"))
        set_(self, "cost", _check_cost(self.cost))
        set_(self, "fallback", _check_names(self.fallback, "fallback"))
        set_(self, "fallback_after_s", _check_fallback_after(self.fallback_after_s))
        set_(self, "api_key_env", _check_env(self.api_key_env))
        if self.name in self.fallback:
            raise _Problem("fallback", f"endpoint '{self.name}' falls back on itself",
                           "Name other endpoints in fallback; the endpoint itself is always tried first.")
        if self.name in self.aliases:
            raise _Problem("aliases", f"alias '{self.name}' repeats the endpoint's own name",
                           "Remove it: the name already selects the endpoint.")

    @property
    def models(self) -> tuple[str, ...]:
        """Every model name that selects this endpoint: its name, then its aliases."""
        return (self.name, *self.aliases)

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name, "aliases": list(self.aliases), "cost": self.cost,
            "fallback": list(self.fallback), "fallback_after_s": self.fallback_after_s,
            "api_key_env": self.api_key_env,
        }


@dataclass(frozen=True)
class Catalog:
    """The endpoints one proxy serves, in configured order; every name and alias is unique."""

    specs: tuple[EndpointSpec, ...]
    _by_model: dict[str, EndpointSpec] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        specs = tuple(self.specs)
        object.__setattr__(self, "specs", specs)
        if not specs:
            raise _Problem(None, "no endpoint is configured", "Give at least one endpoint, " + _EXAMPLE)
        by_model: dict[str, EndpointSpec] = {}
        owner_index: dict[str, int] = {}
        for i, spec in enumerate(specs):
            if not isinstance(spec, EndpointSpec):
                raise _Problem(None, f"item {i + 1} is a {type(spec).__name__}, not an EndpointSpec", "", i)
            for key, model in [("name", spec.name)] + [("aliases", a) for a in spec.aliases]:
                if model in by_model:
                    other, j = by_model[model], owner_index[model] + 1
                    if key == "name" and other.name == model:
                        raise _Problem(key, f"endpoint '{model}' is already defined as #{j}",
                                       "Give each endpoint one [[endpoint]] table: merge the two.", i)
                    what = "name" if key == "name" else "alias"
                    clash = "the name" if other.name == model else "already an alias"
                    raise _Problem(key, f"{what} '{model}' is {clash} of endpoint #{j} '{other.name}'",
                                   "A model name selects one endpoint only: remove or rename one of the two.", i)
                by_model[model] = spec
                owner_index[model] = i
        names = [s.name for s in specs]
        for i, spec in enumerate(specs):
            for target in spec.fallback:
                if target not in names:
                    close = difflib.get_close_matches(target, names, n=1)
                    hint = f"Did you mean '{close[0]}'? " if close else ""
                    raise _Problem("fallback", f"'{target}' is not an endpoint of this configuration",
                                   hint + "Fallback names must be endpoint names (not aliases): " + _listing(names), i)
        object.__setattr__(self, "_by_model", by_model)

    def __iter__(self) -> Iterator[EndpointSpec]:
        return iter(self.specs)

    def __len__(self) -> int:
        return len(self.specs)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(s.name for s in self.specs)

    @property
    def models(self) -> tuple[str, ...]:
        """Every name and alias, in configured order."""
        return tuple(m for s in self.specs for m in s.models)

    def get(self, name: str) -> EndpointSpec | None:
        """The endpoint called `name` (names only, not aliases)."""
        spec = self._by_model.get(name)
        return spec if spec is not None and spec.name == name else None

    def by_model(self, model: str) -> EndpointSpec | None:
        """The endpoint a request's `model` selects: exact match on a name or an alias."""
        return self._by_model.get(model)

    def fallbacks(self, spec: EndpointSpec) -> tuple[EndpointSpec, ...]:
        """The endpoints to try, in order, when `spec` has no worker ready in time (not transitive)."""
        return tuple(self._by_model[n] for n in spec.fallback)

    def to_json(self) -> dict[str, Any]:
        """A JSON-safe form for another process; `from_json` reads it back (specs hold no keys)."""
        return {"endpoints": [s.to_json() for s in self.specs]}


# --- building a catalog -----------------------------------------------------------------------
def load_config(path: str) -> Catalog:
    """The catalog of a TOML config file (format in the module docstring); `BadConfig` if bad."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise BadConfig(f"cannot read the endpoint config file {path}: {e.strerror or e}",
                        "Check the path given to --config.") from None
    try:
        text = raw.decode("utf-8")
        data = tomllib.loads(text)
    except UnicodeDecodeError as e:
        raise BadConfig(f"{path}: not UTF-8 text (byte {e.start})", "Save the config file as UTF-8.") from None
    except tomllib.TOMLDecodeError as e:
        # tomllib's message carries "(at line L, column C)"; it never quotes the value.
        raise BadConfig(f"{path}: not valid TOML: {e}",
                        "Fix the TOML syntax at the place named; strings need double quotes, lists [\"a\", \"b\"]. "
                        + _EXAMPLE) from None
    return _from_document(data, _Where(path, text))


def from_names(names: Iterable[str], cost: float | str = DEFAULT_COST) -> Catalog:
    """The catalog of the command line: `--endpoint A --endpoint B` and `--cost auto|N`."""
    names = list(names)
    parsed_cost = parse_cost_option(cost)
    where = _Where("the command line", None, item="--endpoint")
    seen: set[str] = set()
    specs = []
    for i, name in enumerate(names):
        if name in seen:
            raise where.error(_Problem(None, f"endpoint '{name}' is given twice",
                                       "Give each endpoint once.", i), name)
        seen.add(name)
        try:
            specs.append(EndpointSpec(name=name, cost=parsed_cost))
        except _Problem as p:
            raise where.error(p, name if isinstance(name, str) else None, i) from None
    try:
        return Catalog(tuple(specs))
    except _Problem as p:
        raise where.error(p, None) from None


def parse_cost_option(value: float | str) -> Cost:
    """`--cost auto|NUMBER` (or a number already): 'auto' or a positive, finite float."""
    if isinstance(value, str):
        text = value.strip()
        if text.lower() == AUTO:
            return AUTO
        try:
            value = float(text)
        except ValueError:
            raise BadConfig(f"--cost must be 'auto' or a number, got {text[:40]!r}",
                            "Use --cost auto (workload from max_tokens) or --cost N with N > 0.") from None
    try:
        return _check_cost(value)
    except _Problem as p:
        raise BadConfig(f"--cost: {p.problem}", p.hint) from None


def from_json(data: Mapping[str, Any] | str | bytes) -> Catalog:
    """The catalog that `Catalog.to_json` wrote (a dict or its JSON text), checked as a file is."""
    if isinstance(data, (str, bytes)):
        try:
            data = json.loads(data)
        except ValueError as e:
            raise BadConfig(f"the endpoint catalog is not JSON: {e}",
                            "Pass Catalog.to_json() through json.dumps.") from None
    where = _Where("the endpoint catalog (JSON)", None, table="endpoints", item="endpoint")
    if not isinstance(data, Mapping):
        raise BadConfig(f"{where.source}: a JSON object is expected, not {_kind(data)}", "Pass Catalog.to_json().")
    return _from_document(data, where)


# --- choosing per request ---------------------------------------------------------------------
def choose(catalog: Catalog, header_value: str | None, body_model: str | None) -> EndpointSpec:
    """The endpoint a request goes to: `X-Vast-Endpoint`, else the body's `model`, else the only one."""
    if header_value is not None and header_value.strip():
        name = header_value.strip()
        spec = catalog.get(name)
        if spec is None:
            raise UnknownEndpoint(f"{HEADER}: {_short(name)} is not an endpoint of this proxy; "
                                  f"it serves {_listing(catalog.names)}")
        return spec
    if body_model is not None:
        spec = catalog.by_model(body_model)
        if spec is not None:
            return spec
    if len(catalog) == 1:
        return catalog.specs[0]  # one endpoint: every request goes there, whatever its model (as before)
    asked = f"model {_short(body_model)} is" if body_model is not None else "the request names no model and is"
    raise ModelNotFound(f"{asked} not served here; the models are {_listing(catalog.models)}")


def workload(headers_cost: str | None, body: Mapping[str, Any] | None, spec_cost: Cost,
             default: float = DEFAULT_COST) -> float:
    """The cost sent to `/route/`: the header, else the endpoint's number, else for 'auto' the body.

    A bad `X-Serverless-Cost` header raises `BadCost` (400), as today. A bad value in the body
    (negative, a string, true, null) is skipped: the cost only informs the autoscaler, and the
    worker judges the request itself.
    """
    if spec_cost != AUTO:
        return wire.parse_cost(headers_cost, float(spec_cost))
    if headers_cost is not None and headers_cost.strip():
        return wire.parse_cost(headers_cost, default)
    if isinstance(body, Mapping):
        for path in WORKLOAD_FIELDS:
            value = _dig(body, path)
            if _positive_number(value):
                return float(value)
    return default


def models_list(catalog: Catalog, created: int = 0) -> dict[str, Any]:
    """The OpenAI `GET /v1/models` answer: every name and alias, `owned_by` its endpoint."""
    return {
        "object": "list",
        "data": [
            {"id": model, "object": "model", "created": created, "owned_by": spec.name}
            for spec in catalog for model in spec.models
        ],
    }


# --- checks -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Where:
    """Where the configuration came from, to name it (and its lines) in errors."""

    source: str
    text: str | None  # the TOML source, to find lines; None when there are no lines
    table: str = "endpoint"
    item: str = "[[endpoint]]"

    def error(self, p: _Problem, name: str | None, index: int | None = None) -> BadConfig:
        index = p.index if index is None else index
        parts = []
        if index is not None:
            parts.append(f"{self.item} #{index + 1}" + (f" '{name}'" if name else ""))
        if p.key:
            parts.append(f"key '{p.key}'")
        line = self.line_of(index, p.key)
        place = f"{self.source}, line {line}" if line else self.source
        what = ", ".join(parts)
        return BadConfig(f"{place}: {what}: {p.problem}" if what else f"{place}: {p.problem}", p.hint)

    def line_of(self, index: int | None, key: str | None) -> int | None:
        """Best effort: the line of `key` in the index-th `[[endpoint]]` table (or its header)."""
        if self.text is None or index is None:
            return None
        lines = self.text.splitlines()
        header = re.compile(r"\s*\[\[\s*" + re.escape(self.table) + r"\s*\]\]\s*(#.*)?")
        starts = [n for n, line in enumerate(lines) if header.fullmatch(line)]
        if index >= len(starts):
            return None  # inline tables or odd layout: no line rather than a wrong one
        end = next((n for n, line in enumerate(lines) if n > starts[index] and line.lstrip().startswith("[")),
                   len(lines))
        if key:
            assign = re.compile(r"\s*(\"?)" + re.escape(key) + r"\1\s*=")
            for n in range(starts[index] + 1, end):
                if assign.match(lines[n]):
                    return n + 1
        return starts[index] + 1


def _from_document(data: Mapping[str, Any], where: _Where) -> Catalog:
    for key in data:
        if key != where.table:
            close = difflib.get_close_matches(str(key), [where.table], n=1)
            hint = f"Did you mean '{close[0]}'? " if close else ""
            line = _top_line(where.text, str(key))
            place = f"{where.source}, line {line}" if line else where.source
            raise BadConfig(f"{place}: unknown top-level key '{_short_key(key)}'",
                            hint + f"The file holds only {where.item} tables, " + _EXAMPLE)
    tables = data.get(where.table)
    if tables is None:
        raise BadConfig(f"{where.source}: no endpoint is configured", "Give at least one endpoint, " + _EXAMPLE)
    if not isinstance(tables, list) or not all(isinstance(t, Mapping) for t in tables):
        raise BadConfig(f"{where.source}: '{where.table}' must be a list of tables, not {_kind(tables)}",
                        f"Write each endpoint as its own {where.item} table (double brackets), " + _EXAMPLE)
    specs = []
    for i, table in enumerate(tables):
        name = table.get("name")
        shown = name if isinstance(name, str) and name.strip() else None
        try:
            specs.append(_spec_from_table(table))
        except _Problem as p:
            raise where.error(p, shown, i) from None
    try:
        return Catalog(tuple(specs))
    except _Problem as p:
        raise where.error(p, specs[p.index].name if p.index is not None else None) from None


def _spec_from_table(table: Mapping[str, Any]) -> EndpointSpec:
    for key in table:
        if key not in KEYS:
            close = difflib.get_close_matches(str(key), KEYS, n=1)
            hint = f"Did you mean '{close[0]}'? " if close else ""
            # The unknown key's value is never shown: it may be a pasted key.
            raise _Problem(_short_key(key), "unknown key", hint + "The keys are: " + ", ".join(KEYS) + ".")
    if "name" not in table:
        raise _Problem("name", "missing", "Every endpoint needs its Vast endpoint name, " + _EXAMPLE)
    return EndpointSpec(
        name=table["name"],
        aliases=_list(table.get("aliases", ()), "aliases"),
        cost=table.get("cost", DEFAULT_COST),
        fallback=_list(table.get("fallback", ()), "fallback"),
        fallback_after_s=table.get("fallback_after_s", DEFAULT_FALLBACK_AFTER_S),
        api_key_env=table.get("api_key_env"),
    )


def _list(value: Any, key: str) -> tuple:
    if isinstance(value, (list, tuple)):
        return tuple(value)
    raise _Problem(key, f"must be a list of strings, not {_kind(value)}", f'Write {key} = ["a", "b"] (or leave it out).')


def _check_name(value: Any, key: str) -> str:
    what = "a name" if key == "name" else f"each item of {key}"
    if not isinstance(value, str):
        raise _Problem(key, f"{what} must be a string, not {_kind(value)}", 'Quote it: name = "my-endpoint".')
    if not value.strip():
        raise _Problem(key, f"{what} must not be empty", "Give the name as it appears on Vast, e.g. \"llama-8b\".")
    if value != value.strip() or not value.isprintable():
        raise _Problem(key, f"{_short(value)} has surrounding spaces or control characters",
                       "Write the name without leading/trailing spaces or control characters.")
    return value


def _check_names(value: Any, key: str) -> tuple[str, ...]:
    if not isinstance(value, (list, tuple)):
        raise _Problem(key, f"must be a list of strings, not {_kind(value)}", f'Write {key} = ["a", "b"].')
    names = tuple(_check_name(v, key) for v in value)
    dup = next((n for i, n in enumerate(names) if n in names[:i]), None)
    if dup is not None:
        raise _Problem(key, f"'{dup}' is listed twice", "List each name once.")
    return names


def _check_cost(value: Any) -> Cost:
    hint = 'cost is a positive number of workload units per request, or "auto" (from max_tokens in the body).'
    if isinstance(value, str):
        if value == AUTO:
            return AUTO
        raise _Problem("cost", f"the only text cost is \"auto\", got {_short(value)}", hint)
    if not _is_number(value):
        raise _Problem("cost", f"must be a number or \"auto\", not {_kind(value)}", hint)
    if not _finite(value) or value <= 0:
        raise _Problem("cost", f"must be a positive, finite number, got {value}", hint)
    return float(value)


def _check_fallback_after(value: Any) -> float:
    hint = "fallback_after_s is the seconds to wait for a ready worker before the fallback, e.g. 30 (0: at once)."
    if not _is_number(value):
        raise _Problem("fallback_after_s", f"must be a number, not {_kind(value)}", hint)
    if not _finite(value) or value < 0:
        raise _Problem("fallback_after_s", f"must be a finite number >= 0, got {value}", hint)
    return float(value)


def _check_env(value: Any) -> str | None:
    # Never echo the value: a key pasted here must not reach the terminal or a log.
    hint = 'api_key_env names an environment variable holding the key, e.g. api_key_env = "VAST_KEY_LLAMA"; never the key itself.'
    if value is None:
        return None
    if not isinstance(value, str):
        raise _Problem("api_key_env", f"must be a string, not {_kind(value)}", hint)
    if _LOOKS_LIKE_KEY.fullmatch(value):
        raise _Problem("api_key_env", "looks like an API key, not a variable name (value not shown)", hint)
    if not _ENV_NAME.fullmatch(value):
        raise _Problem("api_key_env", "is not a valid environment variable name (value not shown)", hint)
    return value


# --- small helpers ----------------------------------------------------------------------------
def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)  # True is an int in Python


def _finite(value: int | float) -> bool:
    try:
        return math.isfinite(value)
    except OverflowError:  # an int too large for a float
        return False


def _positive_number(value: Any) -> bool:
    return _is_number(value) and _finite(value) and value > 0


def _dig(body: Mapping[str, Any], path: tuple[str, ...]) -> Any:
    value: Any = body
    for part in path:
        if not isinstance(value, Mapping):
            return None
        value = value.get(part)
    return value


def _kind(value: Any) -> str:
    """A value's type in TOML/JSON words, so messages need not show the value."""
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, (list, tuple)):
        return "a list"
    if isinstance(value, Mapping):
        return "a table"
    if value is None:
        return "null"
    return f"a {type(value).__name__}"


def _short(text: str, limit: int = 80) -> str:
    return repr(text if len(text) <= limit else text[:limit] + "...")


def _short_key(key: Any) -> str:
    text = str(key)
    if _LOOKS_LIKE_KEY.search(text):
        return "(a name that looks like an API key, not shown)"
    return text if len(text) <= 40 else text[:40] + "..."


def _listing(names: Iterable[str], limit: int = 30) -> str:
    names = list(names)
    shown = ", ".join(f"'{n}'" for n in names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def _top_line(text: str | None, key: str) -> int | None:
    if text is None:
        return None
    pattern = re.compile(r"\s*\[{0,2}\s*(\"?)" + re.escape(key) + r"\1\s*(\]|=|\.)")
    return next((n + 1 for n, line in enumerate(text.splitlines()) if pattern.match(line)), None)
