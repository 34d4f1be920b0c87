"""Unit tests for vespa/proxy/endpoints.py: the endpoint catalog, its config file, and per-request choices."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vespa.proxy import endpoints
from vespa.proxy.endpoints import Catalog, EndpointSpec, choose, from_json, from_names, load_config, workload
from vespa.errors import BadConfig, BadCost, ModelNotFound, UnknownEndpoint, VespaError

fuzz = settings(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])

# The issue's example, verbatim.
EXAMPLE = """\
[[endpoint]]
name = "llama-70b"
aliases = ["meta-llama/Llama-3.3-70B-Instruct", "big"]   # model names that select it
cost = "auto"            # or a number; default 1.0 as today
fallback = ["llama-8b"]  # tried in order when no worker is ready in time
fallback_after_s = 30
api_key_env = "VAST_KEY_LLAMA70B"   # optional: the endpoint key from this variable

[[endpoint]]
name = "llama-8b"
"""

FAKE_KEY = "0123456789abcdef" * 4  # shaped like a Vast key


def write(tmp_path: Path, text: str | bytes, name: str = "vespa.toml") -> str:
    path = tmp_path / name
    path.write_bytes(text.encode() if isinstance(text, str) else text)
    return str(path)


@pytest.fixture
def two() -> Catalog:
    return from_json({"endpoints": [
        {"name": "llama-70b", "aliases": ["meta-llama/Llama-3.3-70B-Instruct", "big"], "cost": "auto"},
        {"name": "llama-8b", "aliases": ["small"]},
    ]})


# --- the config file ---------------------------------------------------------------------------
def test_issue_example_loads_in_order_with_defaults(tmp_path: Path) -> None:
    catalog = load_config(write(tmp_path, EXAMPLE))
    big, small = catalog.specs
    assert catalog.names == ("llama-70b", "llama-8b")
    assert big == EndpointSpec(
        name="llama-70b", aliases=("meta-llama/Llama-3.3-70B-Instruct", "big"), cost="auto",
        fallback=("llama-8b",), fallback_after_s=30.0, api_key_env="VAST_KEY_LLAMA70B",
    )
    assert (small.aliases, small.cost, small.fallback, small.fallback_after_s, small.api_key_env) == \
        ((), 1.0, (), 30.0, None)
    assert catalog.fallbacks(big) == (small,)
    assert catalog.by_model("big") is big and catalog.by_model("llama-8b") is small
    assert catalog.get("big") is None  # get() takes names only


def test_module_docstring_example_is_a_valid_config(tmp_path: Path) -> None:
    block = re.search(r"```toml\n(.*?)```", endpoints.__doc__ or "", re.S)
    assert block, "the module docstring documents the format with a TOML example"
    assert load_config(write(tmp_path, block.group(1))) == load_config(write(tmp_path, EXAMPLE, "issue.toml"))


def test_numbers_may_be_ints_or_floats_and_fallbacks_may_point_both_ways(tmp_path: Path) -> None:
    catalog = load_config(write(tmp_path, """
[[endpoint]]
name = "a"
cost = 256
fallback = ["b", "c"]
fallback_after_s = 0
[[endpoint]]
name = "b"
cost = 0.5
fallback = ["a"]
[[endpoint]]
name = "c"
"""))
    a, b, c = catalog.specs
    assert (a.cost, a.fallback_after_s, b.cost) == (256.0, 0.0, 0.5)
    assert isinstance(a.cost, float)
    # Fallback lists are not followed transitively, so A <-> B is fine, and order is kept.
    assert catalog.fallbacks(a) == (b, c) and catalog.fallbacks(b) == (a,)


# Each: the file's text, substrings its message must hold (besides the path), one its hint must hold.
BAD_FILES = [
    pytest.param('[[endpoint]]\nname = llama\n', ["not valid TOML", "line 2"], "double quotes", id="toml-syntax"),
    pytest.param('[[endpoint]]\nname = "a"\naliases = ["x",\n', ["not valid TOML"], "TOML", id="toml-unclosed"),
    pytest.param('', ["no endpoint is configured"], "[[endpoint]]", id="empty-file"),
    pytest.param('[endpoint]\nname = "a"\n', ["'endpoint' must be a list of tables, not a table"],
                 "double brackets", id="single-brackets"),
    pytest.param('[[endpoints]]\nname = "a"\n', ["line 1", "unknown top-level key 'endpoints'"],
                 "Did you mean 'endpoint'", id="top-level-typo"),
    pytest.param('[[endpoint]]\nname = "a"\n\n[[endpoint]]\nname = "b"\naliasses = ["x"]\n',
                 ["line 6", "[[endpoint]] #2 'b'", "key 'aliasses'", "unknown key"], "Did you mean 'aliases'",
                 id="unknown-key"),
    pytest.param('[[endpoint]]\naliases = ["x"]\n', ["[[endpoint]] #1", "key 'name'", "missing"],
                 "endpoint name", id="name-missing"),
    pytest.param('[[endpoint]]\nname = ""\n', ["#1", "key 'name'", "must not be empty"], "name", id="name-empty"),
    pytest.param('[[endpoint]]\nname = 7\n', ["#1", "key 'name'", "must be a string, not a number"], "Quote",
                 id="name-number"),
    pytest.param('[[endpoint]]\nname = " a"\n', ["key 'name'", "surrounding spaces"], "spaces", id="name-spaces"),
    pytest.param('[[endpoint]]\nname = "a"\n[[endpoint]]\nname = "a"\n',
                 ["line 4", "[[endpoint]] #2 'a'", "key 'name'", "endpoint 'a' is already defined as #1"],
                 "merge the two", id="name-twice"),
    pytest.param('[[endpoint]]\nname = "a"\naliases = "big"\n',
                 ["line 3", "#1 'a'", "key 'aliases'", "must be a list of strings, not a string"], '["a", "b"]',
                 id="aliases-string"),
    pytest.param('[[endpoint]]\nname = "a"\naliases = ["x", 3]\n',
                 ["key 'aliases'", "each item of aliases must be a string, not a number"], "Quote",
                 id="alias-number"),
    pytest.param('[[endpoint]]\nname = "a"\naliases = ["x", "x"]\n', ["key 'aliases'", "'x' is listed twice"],
                 "once", id="alias-repeated"),
    pytest.param('[[endpoint]]\nname = "a"\naliases = ["a"]\n', ["key 'aliases'", "repeats the endpoint's own name"],
                 "Remove it", id="alias-own-name"),
    pytest.param('[[endpoint]]\nname = "a"\naliases = ["big"]\n[[endpoint]]\nname = "b"\naliases = ["big"]\n',
                 ["line 6", "#2 'b'", "key 'aliases'", "alias 'big' is already an alias of endpoint #1 'a'"],
                 "one endpoint only", id="alias-twice"),
    pytest.param('[[endpoint]]\nname = "a"\n[[endpoint]]\nname = "b"\naliases = ["a"]\n',
                 ["#2 'b'", "key 'aliases'", "alias 'a' is the name of endpoint #1 'a'"],
                 "one endpoint only", id="alias-is-other-name"),
    pytest.param('[[endpoint]]\nname = "a"\naliases = ["b"]\n[[endpoint]]\nname = "b"\n',
                 ["line 5", "#2 'b'", "key 'name'", "name 'b' is already an alias of endpoint #1 'a'"],
                 "one endpoint only", id="name-is-other-alias"),
    pytest.param('[[endpoint]]\nname = "a"\ncost = "cheap"\n', ["line 3", "key 'cost'", "'cheap'"], '"auto"',
                 id="cost-word"),
    pytest.param('[[endpoint]]\nname = "a"\ncost = -1\n', ["key 'cost'", "positive, finite number, got -1"],
                 "positive number", id="cost-negative"),
    pytest.param('[[endpoint]]\nname = "a"\ncost = 0\n', ["key 'cost'", "positive"], "positive", id="cost-zero"),
    pytest.param('[[endpoint]]\nname = "a"\ncost = inf\n', ["key 'cost'", "finite"], "positive", id="cost-inf"),
    pytest.param('[[endpoint]]\nname = "a"\ncost = nan\n', ["key 'cost'", "finite"], "positive", id="cost-nan"),
    pytest.param('[[endpoint]]\nname = "a"\ncost = true\n', ["key 'cost'", "not a boolean"], "positive",
                 id="cost-bool"),
    pytest.param('[[endpoint]]\nname = "a"\nfallback = ["nope"]\n[[endpoint]]\nname = "b"\n',
                 ["line 3", "#1 'a'", "key 'fallback'", "'nope' is not an endpoint"], "'a', 'b'",
                 id="fallback-unknown"),
    pytest.param('[[endpoint]]\nname = "llama-8b"\n[[endpoint]]\nname = "b"\nfallback = ["llama-7b"]\n',
                 ["#2 'b'", "'llama-7b' is not an endpoint"], "Did you mean 'llama-8b'", id="fallback-typo"),
    pytest.param('[[endpoint]]\nname = "a"\naliases = ["x"]\n[[endpoint]]\nname = "b"\nfallback = ["x"]\n',
                 ["#2 'b'", "key 'fallback'", "'x' is not an endpoint"], "not aliases", id="fallback-alias"),
    pytest.param('[[endpoint]]\nname = "a"\nfallback = ["a"]\n', ["key 'fallback'", "falls back on itself"],
                 "other endpoints", id="fallback-self"),
    pytest.param('[[endpoint]]\nname = "a"\nfallback = "b"\n[[endpoint]]\nname = "b"\n',
                 ["key 'fallback'", "must be a list of strings, not a string"], "fallback = [", id="fallback-string"),
    pytest.param('[[endpoint]]\nname = "a"\nfallback = ["b", "b"]\n[[endpoint]]\nname = "b"\n',
                 ["key 'fallback'", "'b' is listed twice"], "once", id="fallback-repeated"),
    pytest.param('[[endpoint]]\nname = "a"\nfallback_after_s = "30"\n',
                 ["key 'fallback_after_s'", "must be a number, not a string"], "seconds", id="after-string"),
    pytest.param('[[endpoint]]\nname = "a"\nfallback_after_s = -5\n', ["key 'fallback_after_s'", ">= 0"], "seconds",
                 id="after-negative"),
    pytest.param('[[endpoint]]\nname = "a"\napi_key_env = 5\n', ["key 'api_key_env'", "must be a string"],
                 "environment variable", id="env-number"),
    pytest.param('[[endpoint]]\nname = "a"\napi_key_env = "MY KEY"\n',
                 ["key 'api_key_env'", "not a valid environment variable name"], "environment variable",
                 id="env-bad-name"),
]


@pytest.mark.parametrize("text, in_message, in_hint", BAD_FILES)
def test_bad_file_is_refused_with_file_endpoint_key_and_hint(
        tmp_path: Path, text: str, in_message: list[str], in_hint: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(BadConfig) as info:
        load_config(path)
    err = info.value
    assert type(err) is BadConfig  # the one public type, not an internal subclass
    assert err.message.startswith(path), err.message
    for part in in_message:
        assert part in err.message, (part, err.message)
    assert in_hint in err.hint, (in_hint, err.hint)
    assert err.to_json()["error"]["type"] == "bad_config"


@pytest.mark.parametrize("text", [
    f'[[endpoint]]\nname = "a"\napi_key_env = "{FAKE_KEY}"\n',                  # a key pasted in place of a name
    f'[[endpoint]]\nname = "a"\napi_key_env = "key {FAKE_KEY}"\n',              # not even a valid name
    f'[[endpoint]]\nname = "a"\napi_key = "{FAKE_KEY}"\n',                      # an unknown key holding a key
    f'[[endpoint]]\nname = "a"\n"{FAKE_KEY}" = 1\n',                            # a key as a key name
])
def test_a_key_in_the_file_is_never_repeated_in_the_error(tmp_path: Path, text: str) -> None:
    with pytest.raises(BadConfig) as info:
        load_config(write(tmp_path, text))
    shown = info.value.message + info.value.hint + str(info.value)
    assert FAKE_KEY[:12] not in shown, shown


def test_api_key_env_that_looks_like_a_key_is_called_out(tmp_path: Path) -> None:
    with pytest.raises(BadConfig, match="looks like an API key"):
        load_config(write(tmp_path, f'[[endpoint]]\nname = "a"\napi_key_env = "{FAKE_KEY}"\n'))


def test_unreadable_and_non_utf8_files_are_refused(tmp_path: Path) -> None:
    missing = str(tmp_path / "nope.toml")
    with pytest.raises(BadConfig, match="cannot read") as info:
        load_config(missing)
    assert missing in info.value.message and "--config" in info.value.hint
    with pytest.raises(BadConfig, match="not UTF-8"):
        load_config(write(tmp_path, b'[[endpoint]]\nname = "caf\xe9"\n'))


def test_line_is_left_out_rather_than_guessed_for_inline_tables(tmp_path: Path) -> None:
    path = write(tmp_path, 'endpoint = [{name = "a"}, {name = "b", cost = -2}]\n')
    with pytest.raises(BadConfig) as info:
        load_config(path)
    assert not re.search(r", line \d", info.value.message), info.value.message
    assert "#2 'b'" in info.value.message and "key 'cost'" in info.value.message


# --- direct construction, the command line, JSON ----------------------------------------------
def test_spec_checks_itself_and_normalises() -> None:
    spec = EndpointSpec(name="a", aliases=["x"], cost=2, fallback=["b"], fallback_after_s=1)  # type: ignore[arg-type]
    assert spec.aliases == ("x",) and spec.fallback == ("b",)
    assert spec.cost == 2.0 and isinstance(spec.cost, float) and isinstance(spec.fallback_after_s, float)
    for bad in [dict(name=""), dict(name="a", cost=-1), dict(name="a", aliases="x"), dict(name="a", fallback=["a"])]:
        with pytest.raises(BadConfig):
            EndpointSpec(**bad)  # type: ignore[arg-type]


def test_catalog_refuses_clashes_and_dangling_fallbacks() -> None:
    with pytest.raises(BadConfig, match="already"):
        Catalog((EndpointSpec("a", aliases=("m",)), EndpointSpec("b", aliases=("m",))))
    with pytest.raises(BadConfig, match="not an endpoint"):
        Catalog((EndpointSpec("a", fallback=("b",)),))
    with pytest.raises(BadConfig, match="no endpoint"):
        Catalog(())


def test_from_names_is_the_command_line_form() -> None:
    catalog = from_names(["a", "b"], cost="auto")
    assert catalog.names == ("a", "b")
    assert all(s.cost == "auto" and s.aliases == () and s.fallback == () for s in catalog)
    assert [s.cost for s in from_names(["a"], cost="256")] == [256.0]
    assert [s.cost for s in from_names(["a"])] == [1.0]
    assert [s.cost for s in from_names(["a"], cost=" AUTO ")] == ["auto"]


@pytest.mark.parametrize("names, cost, expected", [
    (["a", "a"], 1.0, "given twice"),
    ([], 1.0, "no endpoint"),
    (["a", ""], 1.0, "--endpoint #2"),
    (["a"], "lots", "--cost must be 'auto' or a number, got 'lots'"),
    (["a"], "-3", "positive"),
    (["a"], "nan", "finite"),
    (["a"], 0, "positive"),
])
def test_from_names_refuses_bad_flags(names: list[str], cost: float | str, expected: str) -> None:
    with pytest.raises(BadConfig, match=re.escape(expected)):
        from_names(names, cost=cost)


names_st = st.text(st.characters(codec="utf-8"), min_size=1, max_size=12).filter(
    lambda s: s.isprintable() and s == s.strip())


@fuzz
@given(st.one_of(st.text(max_size=8), st.integers(), st.none(), st.lists(st.text(max_size=3), max_size=2)),
       st.one_of(st.text(max_size=8), st.floats(), st.integers(), st.booleans(), st.none()))
def test_any_spec_value_is_taken_or_refused_as_bad_config(name: object, cost: object) -> None:
    try:
        spec = EndpointSpec(name=name, cost=cost)  # type: ignore[arg-type]
    except BadConfig:
        return
    assert spec.name == name and (spec.cost == "auto" or spec.cost > 0)


@st.composite
def catalogs(draw: st.DrawFn) -> Catalog:
    models = draw(st.lists(names_st, min_size=1, max_size=12, unique=True))
    n = draw(st.integers(1, len(models)))
    names, rest = models[:n], models[n:]
    specs = []
    for i, name in enumerate(names):
        mine = rest[i::n]
        others = [x for x in names if x != name]
        specs.append(EndpointSpec(
            name=name, aliases=tuple(mine),
            cost=draw(st.one_of(st.just("auto"), st.floats(min_value=1e-6, max_value=1e9))),
            fallback=tuple(draw(st.lists(st.sampled_from(others), unique=True)) if others else ()),
            fallback_after_s=draw(st.floats(min_value=0, max_value=3600)),
            api_key_env=draw(st.one_of(st.none(), st.from_regex(r"[A-Z_][A-Z0-9_]{0,20}", fullmatch=True))),
        ))
    return Catalog(tuple(specs))


@fuzz
@given(catalogs())
def test_json_round_trip_through_text(catalog: Catalog) -> None:
    text = json.dumps(catalog.to_json(), allow_nan=False)  # JSON-safe: no NaN/inf, no tuples needed
    assert from_json(text) == catalog
    assert from_json(json.loads(text)) == catalog


@pytest.mark.parametrize("data, expected", [
    ("{nope", "not JSON"),
    ("[]", "a JSON object is expected"),
    ({"endpoints": [{"name": "a", "key": "x"}]}, "key 'key': unknown key"),
    ({"endpoints": [{"name": "a", "fallback": ["z"]}]}, "endpoint #1 'a', key 'fallback'"),
    ({"endpoint": []}, "unknown top-level key 'endpoint'"),
    ({"endpoints": []}, "no endpoint"),
])
def test_from_json_checks_like_the_file(data: object, expected: str) -> None:
    with pytest.raises(BadConfig, match=re.escape(expected)):
        from_json(data)  # type: ignore[arg-type]


# --- choosing the endpoint ----------------------------------------------------------------------
def test_header_wins_over_model(two: Catalog) -> None:
    assert choose(two, "llama-8b", "big").name == "llama-8b"
    assert choose(two, "  llama-8b ", None).name == "llama-8b"


def test_model_selects_by_name_or_alias(two: Catalog) -> None:
    assert choose(two, None, "llama-70b").name == "llama-70b"
    assert choose(two, None, "meta-llama/Llama-3.3-70B-Instruct").name == "llama-70b"
    assert choose(two, None, "small").name == "llama-8b"
    assert choose(two, "", "small").name == "llama-8b"  # a blank header is no header


def test_unknown_header_is_a_404_naming_the_endpoints(two: Catalog) -> None:
    with pytest.raises(UnknownEndpoint) as info:
        choose(two, "big", "llama-8b")  # aliases are model names, not endpoint names
    err = info.value
    assert err.status == 404 and err.type == "unknown_endpoint"
    assert "'llama-70b', 'llama-8b'" in err.message and "X-Vast-Endpoint" in err.message
    single = from_names(["only"])
    with pytest.raises(UnknownEndpoint):
        choose(single, "other", None)  # an explicit wrong name is an error even with one endpoint


@pytest.mark.parametrize("model", ["gpt-4o", "LLAMA-8B", None])
def test_several_endpoints_and_no_match_is_model_not_found(two: Catalog, model: str | None) -> None:
    with pytest.raises(ModelNotFound) as info:
        choose(two, None, model)
    err = info.value
    assert err.status == 404 and err.headers()["X-Vespa-Error"] == "model_not_found"
    body = json.loads(err.body())["error"]
    assert body["type"] == "model_not_found" and body["code"] == "model_not_found" and body["param"] == "model"
    for known in two.models:
        assert f"'{known}'" in body["message"]
    assert body["hint"] and "/v1/models" in body["hint"]


def test_a_huge_model_name_is_cut_in_the_message(two: Catalog) -> None:
    with pytest.raises(ModelNotFound) as info:
        choose(two, None, "m" * 100_000)
    assert len(info.value.message) < 500


def test_one_endpoint_takes_every_model() -> None:
    single = from_names(["only"])
    for model in ["gpt-4o", None, "only"]:
        assert choose(single, None, model).name == "only"


# --- workload ---------------------------------------------------------------------------------
@pytest.mark.parametrize("header, body, expected", [
    ("64", {"max_tokens": 512}, 64.0),                                   # the header wins
    (None, {"max_tokens": 512}, 512.0),
    (None, {"max_completion_tokens": 300}, 300.0),
    (None, {"max_new_tokens": 200}, 200.0),
    (None, {"inputs": "hi", "parameters": {"max_new_tokens": 128}}, 128.0),  # TGI
    (None, {"max_tokens": 100, "max_completion_tokens": 300}, 100.0),    # max_tokens first
    (None, {"max_tokens": None, "max_completion_tokens": 300}, 300.0),   # null is skipped
    (None, {"max_tokens": True}, 1.0),                                   # a bool is not a number
    (None, {"max_tokens": -5}, 1.0),
    (None, {"max_tokens": 0}, 1.0),
    (None, {"max_tokens": "512"}, 1.0),
    (None, {"max_tokens": 10**400}, 1.0),                                # too big for a float
    (None, {"max_tokens": float("nan")}, 1.0),
    (None, {"parameters": "x"}, 1.0),
    (None, {"messages": []}, 1.0),
    (None, None, 1.0),
    ("  ", {"max_tokens": 7}, 7.0),                                      # a blank header is no header
])
def test_workload_auto(header: str | None, body: dict | None, expected: float) -> None:
    cost = workload(header, body, "auto", 1.0)
    assert cost == expected and isinstance(cost, float)


def test_workload_auto_uses_the_given_default() -> None:
    assert workload(None, {"prompt": "x"}, "auto", 8.0) == 8.0


def test_workload_with_a_number_ignores_the_body() -> None:
    assert workload(None, {"max_tokens": 512}, 3.0, 1.0) == 3.0
    assert workload("9", {"max_tokens": 512}, 3.0, 1.0) == 9.0


@pytest.mark.parametrize("header", ["abc", "-1", "0", "inf", "nan"])
@pytest.mark.parametrize("spec_cost", ["auto", 2.0])
def test_workload_bad_header_is_bad_cost(header: str, spec_cost: float | str) -> None:
    with pytest.raises(BadCost):
        workload(header, {"max_tokens": 5}, spec_cost, 1.0)  # type: ignore[arg-type]


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=5),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(
        st.sampled_from(["max_tokens", "max_completion_tokens", "max_new_tokens", "parameters", "x"]), inner, max_size=4),
    max_leaves=12)


@fuzz
@given(st.dictionaries(st.sampled_from(["max_tokens", "max_completion_tokens", "max_new_tokens", "parameters", "n"]),
                       json_values, max_size=5))
def test_workload_is_always_a_positive_finite_float(body: dict) -> None:
    cost = workload(None, body, "auto", 1.0)
    assert isinstance(cost, float) and math.isfinite(cost) and cost > 0


# --- /v1/models -------------------------------------------------------------------------------
def test_models_list_has_every_name_and_alias(two: Catalog) -> None:
    listing = endpoints.models_list(two)
    assert listing["object"] == "list"
    assert [(m["id"], m["owned_by"]) for m in listing["data"]] == [
        ("llama-70b", "llama-70b"), ("meta-llama/Llama-3.3-70B-Instruct", "llama-70b"), ("big", "llama-70b"),
        ("llama-8b", "llama-8b"), ("small", "llama-8b"),
    ]
    assert all(m["object"] == "model" and isinstance(m["created"], int) for m in listing["data"])
    json.dumps(listing)


def test_models_list_parses_as_the_openai_sdk_models(two: Catalog) -> None:
    from openai.types import Model

    models = [Model.model_validate(m) for m in endpoints.models_list(two, created=1_700_000_000)["data"]]
    assert {m.id for m in models} == set(two.models)
    assert {m.created for m in models} == {1_700_000_000}


def test_every_error_here_is_a_vespa_error() -> None:
    for cls in (BadConfig, ModelNotFound, UnknownEndpoint):
        assert issubclass(cls, VespaError) and cls.default_hint
