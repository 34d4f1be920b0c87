"""`scripts/run.sh`: find the endpoint and its key, then start mitmproxy with vespa_addon.py.

Keys reach mitmproxy only through its environment (VAST_API_KEY), never its arguments, which
any local user can read in `ps`. The account key is not handed on at all: the addon needs
only the endpoint key.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import dataclasses
import difflib
import getpass
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Iterator, NoReturn

import requests
from mitmproxy import exceptions

from vespa import keys
from vespa.cli import console, replay
from vespa.proxy import endpoints
from vespa.errors import AutoscalerUnreachable, BadKey, EndpointNotFound, KeyRejected, VespaError
from vespa.cli.instances import INSTANCES, Instance
from vespa.procs import stop

REPO = Path(__file__).resolve().parents[2]
# The checkout, or site-packages when installed: pyproject.toml installs vespa_addon.py there too.
ADDON = REPO / "vespa_addon.py"
DEFAULT_PORT = 8010
LOCAL_HOSTS = {"127.0.0.1", "localhost", "::1"}
DEMO_READY_TIMEOUT_S = 30.0
# How often the demo checks that its emulator still runs: a dead one would leave the proxy
# answering 502 to everything.
WATCH_INTERVAL_S = 0.5
RULE = "=" * 60


class UsageError(VespaError):
    type = "usage"


class PortInUse(VespaError):
    type = "port_in_use"


class LaunchError(VespaError):
    type = "launch_failed"


@dataclass(frozen=True)
class Target:
    """What the proxy serves: an endpoint, its key, and a masked account of where the key came from."""

    endpoint: str
    key: str = field(repr=False)
    key_source: str
    direct: bool  # the key was given as an endpoint key, not fetched through the console


@dataclass(frozen=True)
class Proxy:
    target: Target
    host: str
    port: int
    autoscaler_url: str
    web: bool
    debug: bool
    extra: list[str]
    console_url: str  # where the addon downloads Vast's worker root CA
    options: tuple[str, ...] = ()  # more --set options for the addon (several endpoints, cost)
    env: dict[str, str] = field(default_factory=dict, repr=False)  # more environment (several endpoints' keys)

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"


# --- command line -------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="scripts/run.sh",
        usage="%(prog)s [options] [-- MITMPROXY_ARGS ...]",
        description="Vespa: a local proxy that makes a Vast.ai Serverless endpoint look like a plain HTTP server.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=EPILOG.format(key_file=key_file()),
    )
    g = p.add_argument_group("endpoint and keys (flags > environment > key files)")
    g.add_argument(
        "--endpoint", metavar="NAME", action="append",
        help="endpoint name (or env VAST_ENDPOINT); repeat it to serve several from one proxy, "
        "chosen per request by the body's model or the X-Vast-Endpoint header",
    )
    g.add_argument("--all-endpoints", action="store_true", help="serve every endpoint of the account (needs the account key)")
    g.add_argument(
        "--config", metavar="FILE",
        help="a TOML file of endpoints (names, aliases, cost, fallback, api_key_env): see the README",
    )
    g.add_argument(
        "--cost", metavar="auto|N",
        help="workload units per request for the endpoints given here: a number (default 1), or 'auto' "
        "to send the body's max_tokens, as Vast counts LLM load; a request's X-Serverless-Cost wins",
    )
    g.add_argument("--api-key", metavar="KEY", help="the endpoint's own API key (or env VAST_API_KEY)")
    g.add_argument(
        "--account-key",
        metavar="KEY",
        help="account API key; Vespa fetches the endpoint key with it (or env VAST_ACCOUNT_KEY, "
        f"or the key file {key_file()} or ~/.vast_api_key)",
    )
    g.add_argument(
        "--list",
        action="store_true",
        help="list the account's endpoints and exit (needs the account key; asked for in a terminal)",
    )
    g = p.add_argument_group("local proxy")
    g.add_argument("--port", type=int, metavar="PORT", help=f"port to listen on (default: {DEFAULT_PORT})")
    g.add_argument(
        "--host",
        default="127.0.0.1",
        metavar="HOST",
        help="address to listen on (default: 127.0.0.1; anything else makes the proxy reachable from the network)",
    )
    g.add_argument("--web", action="store_true", help="run mitmweb (web UI to inspect requests) instead of mitmdump")
    g.add_argument(
        "--replay",
        metavar="FILE",
        help="send every request of a saved flow file (-w) again, routed and signed afresh, print one line per "
        "flow and exit (0: a worker answered each); URLs come from these options, never from the file",
    )
    g.add_argument("--debug", action="store_true", help="verbose mitmproxy log, and tracebacks on errors")
    g = p.add_argument_group("Vast services")
    g.add_argument(
        "--instance",
        choices=list(INSTANCES),
        default="prod",
        help="which Vast deployment (default: prod): sets the two URLs below",
    )
    g.add_argument("--autoscaler-url", metavar="URL", help="autoscaler base URL (default: https://run.vast.ai)")
    g.add_argument(
        "--console-url",
        metavar="URL",
        help="account API base URL (default: https://console.vast.ai; or env VAST_URL)",
    )
    g = p.add_argument_group("try it")
    g.add_argument(
        "--demo",
        action="store_true",
        help="start a local Vast emulator with a demo endpoint and serve it; no account needed",
    )
    return p


EPILOG = """\
mitmproxy:
  -- ARGS              everything after -- goes to mitmdump/mitmweb, e.g. -- -w flows.mitm,
                       or Vespa's own options: -- --set vespa_route_deadline_s=900
                       (all of them: docs/OPTIONS.md)

interactive mode:
  With no endpoint or no key, and a terminal, Vespa asks for the account key (hidden), lists
  the endpoints to choose (by number or name), and can save the key to {key_file} (0600).
  Without a terminal, missing information is an error (exit status 2).

examples:
  scripts/run.sh --demo
  VAST_ACCOUNT_KEY=... scripts/run.sh --endpoint my-endpoint
  scripts/run.sh --list
  scripts/run.sh --replay flows.mitm --endpoint my-endpoint
"""


def key_file() -> str:
    """The account key file as hints name it: where `vastai set api-key` writes, XDG_CONFIG_HOME included."""
    return keys.shown_path(keys.default_key_file())


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    """Everything after the first `--` is mitmproxy's, untouched."""
    extra: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, extra = argv[:cut], argv[cut + 1 :]
    args = build_parser().parse_args(argv)
    if args.port is not None and not 0 < args.port < 65536:
        raise UsageError(f"--port {args.port} is not a TCP port", "Use a number from 1 to 65535, e.g. --port 8010.")
    return args, extra


def service_urls(args: argparse.Namespace) -> Instance:
    default = INSTANCES[args.instance]
    return Instance(
        (args.autoscaler_url or default.autoscaler_url).rstrip("/"),
        (args.console_url or os.environ.get("VAST_URL") or default.console_url).rstrip("/"),
    )


def say(line: str = "") -> None:
    print(line, file=sys.stderr, flush=True)


# --- choosing the endpoint and its key ----------------------------------------------------------
def through_console(account: keys.Secret, name: str, console_url: str) -> Target:
    say(f"Fetching the key of endpoint '{name}' with the account key from {account.describe()} ...")
    key = console.fetch_endpoint_key(account.value, name, console_url)
    return Target(name, key, f"account key from {account.describe()} via the console", direct=False)


def missing_info(resolved: keys.Resolved) -> UsageError:
    if resolved.endpoint is None and resolved.account_key is None and resolved.endpoint_key is None:
        return UsageError(
            "no endpoint and no key given, and no terminal to ask for them",
            f"Pass --endpoint NAME and an account key (env VAST_ACCOUNT_KEY or the key file {key_file()}), "
            "or try Vespa without an account: scripts/run.sh --demo",
        )
    if resolved.endpoint is None:
        listing = " (--list shows them)" if resolved.account_key else ""
        return UsageError(
            "no endpoint name given, and no terminal to ask for one",
            f"Pass --endpoint NAME or set env VAST_ENDPOINT{listing}.",
        )
    return UsageError(
        f"no key for endpoint '{resolved.endpoint.value}', and no terminal to ask for one",
        f"Set env VAST_ACCOUNT_KEY (account key) or VAST_API_KEY (endpoint key), or save the account key "
        f"in {key_file()} (chmod 600).",
    )


def choose_target(args: argparse.Namespace, resolved: keys.Resolved, urls: Instance) -> tuple[Target, int]:
    port = args.port or DEFAULT_PORT
    name = resolved.endpoint.value if resolved.endpoint else None
    if name and resolved.prefers_endpoint_key():
        ep_key = resolved.endpoint_key
        return Target(name, ep_key.value, f"endpoint key from {ep_key.describe()}", direct=True), port
    if name and resolved.account_key:
        return through_console(resolved.account_key, name, urls.console_url), port
    if name is None and resolved.endpoint_key and not resolved.account_key:
        raise missing_info(resolved)  # an endpoint key cannot list endpoints: asking would not help
    if not sys.stdin.isatty():
        raise missing_info(resolved)
    return Interactive(urls.console_url, args.host).run(resolved, name, args.port)


def is_port_free(host: str, port: int) -> bool:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        # As mitmproxy binds: a socket left in TIME_WAIT does not count as taken.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def check_port(host: str, port: int) -> None:
    if not is_port_free(host, port):
        raise PortInUse(
            f"port {port} on {host} is already in use",
            f"Stop what is listening there (`ss -ltnp 'sport = :{port}'` shows it), or pick another port: --port {port + 1}.",
        )


class Interactive:
    """The prompts of the user's brief: account key (hidden), endpoint by number or name, port, save."""

    def __init__(self, console_url: str, host: str) -> None:
        self.console_url = console_url
        self.host = host

    def run(self, resolved: keys.Resolved, name: str | None, port: int | None) -> tuple[Target, int]:
        print(f"{RULE}\n  Vespa - Interactive Setup\n{RULE}\n")
        account, endpoints = self.account_and_endpoints(resolved.account_key)
        if not endpoints:
            raise EndpointNotFound("this account has no endpoints", console.NO_ENDPOINTS_HINT)
        if name is None:
            name = self.pick(endpoints).name
        if port is None:
            port = self.ask_port()
        print(f"\nFetching endpoint API key for '{name}'...")
        key = console.key_of(console.find_endpoint(endpoints, name))
        print("Successfully retrieved endpoint API key")
        if account.path is None:
            self.offer_to_save(account)
        return Target(name, key, f"account key from {account.describe()} via the console", direct=False), port

    def account_and_endpoints(self, known: keys.Secret | None) -> tuple[keys.Secret, list[console.Endpoint]]:
        if known is not None:
            print(f"Using the account key from {known.describe()}.")
            return known, self.fetch(known)
        print("First, we need your Vast.ai account API key.")
        print(f"(Get it from: {self.console_url}/account)\n")
        for attempt in range(3):
            typed = getpass.getpass("Enter account API key: ")
            if not typed.strip():
                continue
            try:
                secret = keys.Secret(keys.clean_key(typed, "the prompt", kind="account key"), "the prompt", keys.FLAG)
                return secret, self.fetch(secret)
            except (KeyRejected, BadKey) as exc:
                if attempt == 2:
                    raise
                print(f"error: {exc.message}\nhint: {exc.hint}\n")
        raise UsageError("no account key entered", "Paste the key from the console's account page.")

    def fetch(self, account: keys.Secret) -> list[console.Endpoint]:
        print("\nFetching your endpoints...")
        return console.list_endpoints(account.value, self.console_url)

    def pick(self, endpoints: list[console.Endpoint]) -> console.Endpoint:
        print(f"\nAvailable endpoints ({len(endpoints)}):")
        for i, ep in enumerate(endpoints, 1):
            print(f"  {i}. {ep.name}  ({ep.state})")
        n = len(endpoints)
        # With one endpoint there is nothing to choose: Enter takes it, as the [default] says.
        prompt = f"Select endpoint (1 or its name) [{endpoints[0].name}]: " if n == 1 else (
            f"Select endpoint (1-{n} or a name): "
        )
        while True:
            answer = input(f"\n{prompt}").strip()
            if not answer and n == 1:
                return endpoints[0]
            if answer.isdigit() and 1 <= int(answer) <= n:
                return endpoints[int(answer) - 1]
            for ep in endpoints:
                if ep.name == answer:
                    return ep
            close = difflib.get_close_matches(answer, [ep.name for ep in endpoints], n=1, cutoff=0.5)
            suggestion = f" Did you mean '{close[0]}'? (names are case-sensitive)" if answer and close else ""
            print(f"Please enter a number from 1 to {n} or an endpoint name.{suggestion}")

    def ask_port(self) -> int:
        while True:
            answer = input(f"\nLocal proxy port [{DEFAULT_PORT}]: ").strip() or str(DEFAULT_PORT)
            if not (answer.isdigit() and 0 < int(answer) < 65536):
                print("Please enter a port number from 1 to 65535.")
            elif not is_port_free(self.host, int(answer)):
                print(f"Port {answer} is in use; please pick another.")
            else:
                return int(answer)

    def offer_to_save(self, account: keys.Secret) -> None:
        path = keys.default_key_file()
        replaces = " (replacing the file there)" if path.exists() else ""
        answer = input(f"\nSave this account key to {path}{replaces} for next time (mode 0600)? [y/N]: ")
        if answer.strip().lower() in ("y", "yes"):
            try:
                keys.save_key_file(account.value, path)
            except OSError as exc:
                print(f"warning: could not save the key: {exc.strerror}")
                return
            print(f"Saved to {path}.")


# --- checking the autoscaler --------------------------------------------------------------------
def preflight(proxy: Proxy) -> None:
    """One route call with cost 0 per endpoint (no load, as the SDK polls) to fail now on a wrong
    key or URL."""
    several = json.loads(proxy.env.get("VESPA_ENDPOINT_KEYS", "{}"))
    if not several:
        return _preflight_one(proxy, proxy.target)
    for name, key in several.items():
        _preflight_one(proxy, Target(name, key, proxy.target.key_source, direct=False))


def _preflight_one(proxy: Proxy, t: Target) -> None:
    url = f"{proxy.autoscaler_url}/route/"
    try:
        resp = requests.post(
            url,
            json={"endpoint": t.endpoint, "cost": 0},
            headers={"Authorization": f"Bearer {t.key}"},
            timeout=10,
        )
    except requests.RequestException as exc:
        raise AutoscalerUnreachable(f"cannot reach the autoscaler at {url}: {type(exc).__name__}") from exc
    # The same statuses the addon's router maps (vespa/proxy/routing.py: Router._rejection).
    if resp.status_code in (401, 403):
        raise KeyRejected(f"the autoscaler rejected the {t.key_source} for endpoint '{t.endpoint}'", _rejected_hint(t))
    if resp.status_code in (400, 404):
        raise EndpointNotFound(
            f"the autoscaler does not know endpoint '{t.endpoint}' ({resp.text.strip()[:200]})",
            "Endpoint names are case-sensitive; with your account key, --list shows them.",
        )
    if resp.status_code != 200:
        say(f"warning: the autoscaler answered {resp.status_code} to a test route; starting anyway")


def _rejected_hint(t: Target) -> str:
    if t.direct:
        return (
            "/route/ takes the endpoint's own key; an account key gives 401. If this is your account key, "
            "pass it with --account-key (or env VAST_ACCOUNT_KEY) and Vespa fetches the endpoint key. "
            "Note: here VAST_API_KEY means the endpoint key, unlike in the vastai CLI."
        )
    return "The console's key for this endpoint was refused: it may just have been rotated. Retry in a minute."


# --- several endpoints ---------------------------------------------------------------------------
def _catalog(args: argparse.Namespace, resolved: keys.Resolved, urls: Instance) -> endpoints.Catalog:
    if sum(map(bool, (args.config, args.all_endpoints, args.endpoint))) > 1:
        raise UsageError("give one of --config, --all-endpoints or --endpoint",
                         "A config file names its endpoints itself; --all-endpoints serves every one of the account.")
    if args.config:
        return endpoints.load_config(args.config)
    if args.all_endpoints:
        account = _need_account(resolved, "--all-endpoints")
        names = [ep.name for ep in console.list_endpoints(account.value, urls.console_url)]
        if not names:
            raise EndpointNotFound("this account has no endpoints", console.NO_ENDPOINTS_HINT)
        return endpoints.from_names(names, args.cost or 1.0)
    return endpoints.from_names(args.endpoint, args.cost or 1.0)


def _need_account(resolved: keys.Resolved, why: str) -> keys.Secret:
    if resolved.account_key is None:
        raise UsageError(
            f"{why} needs the account key, to fetch the endpoint keys",
            f"Set env VAST_ACCOUNT_KEY, or save it in {key_file()} (chmod 600).",
        )
    return resolved.account_key


def several(args: argparse.Namespace, extra: list[str], port: int, urls: Instance,
            account: keys.Secret | None, catalog: endpoints.Catalog) -> Proxy:
    """A proxy for every endpoint of `catalog`: keys from the variables the config names, the
    rest with one console call (the console allows 3 a second); all passed in the environment."""
    found: dict[str, str] = {}
    sources: list[str] = []
    for spec in catalog:
        if spec.api_key_env and os.environ.get(spec.api_key_env):
            found[spec.name] = keys.clean_key(os.environ[spec.api_key_env], f"env {spec.api_key_env}",
                                              kind=f"key of endpoint {spec.name}")
            sources.append(f"env {spec.api_key_env}")
    wanted = [spec.name for spec in catalog if spec.name not in found]
    if wanted:
        if account is None:
            raise UsageError(
                f"no key for endpoint(s) {', '.join(wanted)}: the account key fetches them",
                f"Set env VAST_ACCOUNT_KEY, save it in {key_file()} (chmod 600), or name a variable "
                "holding each endpoint's key with api_key_env in the config file.",
            )
        say(f"Fetching the keys of {len(wanted)} endpoint(s) with the account key from {account.describe()} ...")
        listed = console.list_endpoints(account.value, urls.console_url)
        for name in wanted:
            found[name] = console.key_of(console.find_endpoint(listed, name))
        sources.append(f"account key from {account.describe()} via the console")
    options = [f"vespa_config={Path(args.config).resolve()}"] if args.config else [
        f"vespa_endpoint={','.join(catalog.names)}",
        f"vespa_default_cost={endpoints.parse_cost_option(args.cost or 1.0)}",
    ]
    target = Target(", ".join(catalog.names), "", "; ".join(sources), direct=False)
    return Proxy(target, args.host, port, urls.autoscaler_url, args.web, args.debug, extra, urls.console_url,
                 options=tuple(options), env={"VESPA_ENDPOINT_KEYS": json.dumps(found)})


# --- starting mitmproxy -------------------------------------------------------------------------
def mitm_binary(web: bool) -> Path:
    binary = Path(sys.executable).parent / ("mitmweb" if web else "mitmdump")
    if not binary.exists():
        raise LaunchError(
            f"{binary.name} not found next to {sys.executable}",
            "Start Vespa with scripts/run.sh, which installs mitmproxy into the repo's .venv.",
        )
    return binary


WEB_COLUMNS = ("tls", "icon", "method", "path", "status", "size", "time", "comment")


def vespa_options(proxy: Proxy) -> list[str]:
    """The addon's settings (endpoints, URLs, logging): the same for the proxy and for --replay."""
    opts = [
        *(arg for option in proxy.options or (f"vespa_endpoint={proxy.target.endpoint}",) for arg in ("--set", option)),
        "--set", f"vespa_autoscaler_url={proxy.autoscaler_url}",
        "--set", f"vespa_console_url={proxy.console_url}",
        "--set", "connection_strategy=lazy",
        "--set", "flow_detail=0",
    ]  # fmt: skip
    if proxy.debug:
        opts += ["--set", "termlog_verbosity=debug"]
    return opts


def mitm_command(proxy: Proxy) -> list[str]:
    cmd = [
        str(mitm_binary(proxy.web)),
        "-s", str(ADDON),
        "--mode", f"reverse:{proxy.autoscaler_url}",
        "--listen-host", proxy.host,
        "-p", str(proxy.port),
        *vespa_options(proxy),
    ]  # fmt: skip
    if proxy.web:
        # mitmweb's list hides flow.comment unless asked, and it holds Vespa's one-line summary.
        for column in WEB_COLUMNS:
            cmd += ["--set", f"web_columns={column}"]
    return cmd + proxy.extra


def mitm_env(proxy: Proxy) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != keys.ACCOUNT_ENV}
    if proxy.target.key:
        env[keys.ENDPOINT_KEY_ENV] = proxy.target.key
    env["VESPA_KEY_SOURCE"] = proxy.target.key_source
    return {**env, **proxy.env}


def examples(proxy: Proxy, model: str) -> None:
    """What to paste into another terminal: the same for the demo and a real endpoint."""
    body = f'{{"model": "{model}", "messages": [{{"role": "user", "content": "Hello!"}}], "stream": true}}'
    print(f"Base URL: {proxy.url}   (OpenAI-style: {proxy.url}/v1)\n")
    print("Try it from another terminal:\n")
    print(f"  curl --no-buffer {proxy.url}/v1/chat/completions \\")
    print("    -H 'Content-Type: application/json' \\")
    print(f"    -d '{body}'\n")
    print(f"""  # with the openai package (pip install openai):
  python3 - <<'EOF'
  from openai import OpenAI
  client = OpenAI(base_url="{proxy.url}/v1", api_key="not-used")
  stream = client.chat.completions.create(
      model="{model}", messages=[{{"role": "user", "content": "Hello!"}}], stream=True)
  for chunk in stream:
      print(chunk.choices[0].delta.content or "", end="", flush=True)
  print()
  EOF
""", flush=True)


def banner(proxy: Proxy) -> None:
    print(f"\n{RULE}")
    print(f"  Starting proxy for: {proxy.target.endpoint}")
    print(f"  Listening on: {proxy.url}")
    print(f"  Key: {proxy.target.key_source}")
    print(f"  Autoscaler: {proxy.autoscaler_url}")
    if proxy.web:
        print("  Web UI: mitmweb prints its address (with its access token) below; default http://127.0.0.1:8081")
    print(f"{RULE}\n", flush=True)


def start_proxy(proxy: Proxy) -> NoReturn:
    """Become mitmproxy: no parent left to orphan it, and the launcher's own argv (which may hold
    a key flag) is replaced by mitmproxy's."""
    cmd = mitm_command(proxy)
    banner(proxy)
    examples(proxy, "any")
    print(f"Use the model your endpoint serves (curl {proxy.url}/v1/models lists it on LLM workers).")
    print("Ctrl-C stops the proxy.\n", flush=True)
    sys.stderr.flush()
    os.execve(cmd[0], cmd, mitm_env(proxy))


def _die_with_parent() -> None:
    """Children get SIGTERM if the launcher dies, even by SIGKILL (Linux only)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG


def run_child(cmd: list[str], env: dict[str, str], watch: Demo | None = None, stdout: int | None = None) -> int:
    """Run mitmproxy in its own session so one Ctrl-C reaches it once, through us.

    With `watch`, mitmproxy is stopped and LaunchError raised as soon as that process exits:
    a proxy whose emulator is gone could only answer 502.
    """
    child = subprocess.Popen(cmd, env=env, start_new_session=True, preexec_fn=_die_with_parent, stdout=stdout)
    forward = lambda signum, _frame: child.send_signal(signum)  # noqa: E731
    previous = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    try:
        while True:
            with contextlib.suppress(subprocess.TimeoutExpired):
                return child.wait(timeout=None if watch is None else WATCH_INTERVAL_S)
            if watch is not None and watch.proc.poll() is not None:
                raise watch.died()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        stop(child, timeout=5.0)


# --- --list -------------------------------------------------------------------------------------
def list_endpoints(resolved: keys.Resolved, urls: Instance, host: str) -> int:
    account = resolved.account_key
    endpoint_key_note = (
        f"The key in {resolved.endpoint_key.source} is read as an endpoint key, which cannot list endpoints."
        if resolved.endpoint_key
        else ""
    )
    if account is None and sys.stdin.isatty():
        if endpoint_key_note:
            say(f"note: {endpoint_key_note}")
        ask = Interactive(urls.console_url, host)
        account, endpoints = ask.account_and_endpoints(None)
    elif account is None:
        raise UsageError(
            "--list needs your account key, and there is no terminal to ask for it",
            f"Pass --account-key, set env VAST_ACCOUNT_KEY, or save it in {key_file()}. " + endpoint_key_note,
        )
    else:
        say(f"Listing endpoints with the account key from {account.describe()} ...")
        endpoints = console.list_endpoints(account.value, urls.console_url)
        ask = None
    print_endpoints(endpoints, account, urls)
    if ask is not None and endpoints:
        ask.offer_to_save(account)
    return 0


def print_endpoints(endpoints: list[console.Endpoint], account: keys.Secret, urls: Instance) -> None:
    if not endpoints:
        print(f"No endpoints found for this account on {urls.console_url}.")
        say(
            f"hint: create one at {urls.console_url}/endpoints, check that {account.describe()} is the account "
            "key (not an endpoint key), or pick the right deployment with --instance alpha|candidate."
        )
        return
    width = max(len("NAME"), *(len(ep.name) for ep in endpoints))
    print(f"Available endpoints ({len(endpoints)}):")
    print(f"  {'NAME':<{width}}  {'STATE':<10}  MAX WORKERS")
    for ep in endpoints:
        max_workers = "-" if ep.max_workers is None else ep.max_workers
        print(f"  {ep.name:<{width}}  {ep.state:<10}  {max_workers}")


# --- --demo -------------------------------------------------------------------------------------
EMULATOR_CMD = ["-m", "vespa.emulator", "--cold-start", "3", "--https", "--also", "vespa-small"]


@dataclass
class Demo:
    """The running emulator: its ready line, and its stderr for when it dies."""

    proc: subprocess.Popen
    ready: dict
    err: IO[bytes]

    def died(self) -> LaunchError:
        return LaunchError(
            f"the demo emulator exited (status {self.proc.returncode}); the proxy was stopped, "
            f"as it could only answer 502{_tail(self.err)}",
            f"Start the demo again; to see why it stopped, run it by hand: {sys.executable} {' '.join(EMULATOR_CMD)}",
        )


def _tail(err: IO[bytes]) -> str:
    err.seek(0)
    tail = err.read().decode(errors="replace").strip().splitlines()[-5:]
    return ":\n  " + "\n  ".join(tail) if tail else ""


@contextlib.contextmanager
def emulator() -> Iterator[Demo]:
    """The local emulator as a child, ready; stopped on the way out."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(
            [sys.executable, *EMULATOR_CMD],
            cwd=REPO,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=err,
            start_new_session=True,
            preexec_fn=_die_with_parent,
        )
        try:
            yield Demo(proc, _ready_line(proc, out, err), err)
        finally:
            stop(proc, timeout=5.0)


def _ready_line(proc: subprocess.Popen, out: IO[bytes], err: IO[bytes]) -> dict:
    """Its output goes to a file, not a pipe, so nothing blocks if nobody reads it later."""
    deadline = time.monotonic() + DEMO_READY_TIMEOUT_S
    while time.monotonic() < deadline and proc.poll() is None:
        out.seek(0)
        line = out.readline()
        if line.endswith(b"\n"):
            try:
                return json.loads(line)
            except ValueError:
                break
        time.sleep(0.05)
    raise LaunchError(
        "the demo emulator did not start" + _tail(err),
        f"Try it by hand: {sys.executable} {' '.join(EMULATOR_CMD)}",
    )


def run_demo(args: argparse.Namespace, extra: list[str]) -> int:
    port = args.port or DEFAULT_PORT
    check_port(args.host, port)
    say("Starting the local Vast emulator ...")
    # Each emulator run makes a new root CA for its workers, so the proxy's worker-CA cache
    # (vespa/proxy/workerca.py) could never reuse it: the demo's mitmproxy gets a cache of its own,
    # removed with the run, instead of leaving a CA and a bundle behind in ~/.cache every time.
    with emulator() as demo, tempfile.TemporaryDirectory(prefix="vespa-demo-cache-") as cache:
        ready = demo.ready
        account = keys.Secret(ready["account_key"], "the demo emulator", keys.FLAG)
        names = args.endpoint or [ep["name"] for ep in ready["endpoints"]]
        urls = Instance(ready["autoscaler_url"], ready["console_url"])
        proxy = several(args, extra, port, urls, account, endpoints.from_names(names, args.cost or 1.0))
        preflight(proxy)
        cmd = mitm_command(proxy)
        banner(proxy)
        examples(proxy, names[0])
        if len(names) > 1:
            print(f"It serves {len(names)} endpoints, chosen by the request's model: {', '.join(names)}.")
            print(f"  curl {proxy.url}/v1/models   lists them (answered by the proxy, no worker woken).\n")
        print(f"The demo endpoint {names[0]} has a 3 s cold start: the first request waits for a worker.")
        print("Ctrl-C stops the proxy and the emulator.\n", flush=True)
        return run_child(cmd, {**mitm_env(proxy), "XDG_CACHE_HOME": cache}, watch=demo)


# --- --replay -----------------------------------------------------------------------------------
def run_replay(proxy: Proxy, path: Path) -> int:
    """Replay a saved file through a fresh mitmdump with Vespa; one line per flow on stdout
    (mitmdump's own log goes to stderr). 0 when a worker answered every flow, else 1."""
    try:
        flows = replay.read(path)
    except (OSError, exceptions.FlowReadException) as exc:
        raise UsageError(f"cannot read {path} as saved flows ({exc})", "Give a file written with -w or mitmweb's File > Save.") from None
    if not flows:
        raise UsageError(f"{path} holds no HTTP flows to replay", "Give a file written with -w or mitmweb's File > Save.")
    preflight(proxy)
    # Only what the proxy itself is started with: the endpoint and the two URLs come from the
    # command line and its defaults, never from the file.
    options = ["--mode", f"reverse:{proxy.autoscaler_url}", *vespa_options(proxy)]
    say(f"Replaying {len(flows)} flow(s) of {path} to endpoint '{proxy.target.endpoint}' via {proxy.autoscaler_url} ...")
    with tempfile.TemporaryDirectory(prefix="vespa-replay-") as tmp:
        out = replay.user_wfile(proxy.extra) or Path(tmp) / "replayed.mitm"
        cmd = replay.command(mitm_binary(False), ADDON, path, out, options, proxy.extra)
        code = run_child(cmd, mitm_env(proxy), stdout=sys.stderr.fileno())
        results = replay.outcomes(flows, out)
    for result in results:
        print(result.line(), flush=True)
    failed = [r for r in results if not r.answered]
    say(f"{len(results) - len(failed)} of {len(results)} flow(s) answered by a worker")
    if code != 0:
        say(f"error: mitmdump exited with status {code}")
    return 0 if code == 0 and not failed else 1


# --- main ---------------------------------------------------------------------------------------
def run(args: argparse.Namespace, extra: list[str]) -> int:
    if args.host not in LOCAL_HOSTS:
        say(f"warning: listening on {args.host}: the proxy, and your endpoint with it, is reachable from the network.")
    if args.demo:
        if args.replay:
            raise UsageError("--replay and --demo do not go together", "Replay against a real endpoint: --endpoint NAME.")
        return run_demo(args, extra)
    if args.account_key or args.api_key:
        say(
            "note: a key given as a flag is visible to other local users in `ps` while Vespa starts; "
            f"prefer env VAST_ACCOUNT_KEY / VAST_API_KEY or the key file {key_file()}."
        )
    urls = service_urls(args)
    resolved = keys.resolve(account_key=args.account_key, api_key=args.api_key,
                            endpoint=args.endpoint[0] if args.endpoint else None)
    for warning in resolved.warnings:
        say(f"warning: {warning}")
    if args.list:
        return list_endpoints(resolved, urls, args.host)
    if args.all_endpoints or args.config or (args.endpoint and len(args.endpoint) > 1):
        port = args.port or DEFAULT_PORT
        if args.replay:  # no proxy listens: the port is not needed
            proxy = several(args, extra, port, urls, resolved.account_key, _catalog(args, resolved, urls))
            return run_replay(dataclasses.replace(proxy, port=0, web=False), Path(args.replay))
        check_port(args.host, port)
        proxy = several(args, extra, port, urls, resolved.account_key, _catalog(args, resolved, urls))
        preflight(proxy)
        start_proxy(proxy)
    if args.cost is not None:
        extra = ["--set", f"vespa_default_cost={endpoints.parse_cost_option(args.cost)}", *extra]
    target, port = choose_target(args, resolved, urls)
    if args.replay:
        proxy = Proxy(target, args.host, 0, urls.autoscaler_url, False, args.debug, extra, urls.console_url)
        return run_replay(proxy, Path(args.replay))
    check_port(args.host, port)
    proxy = Proxy(target, args.host, port, urls.autoscaler_url, args.web, args.debug, extra, urls.console_url)
    preflight(proxy)
    start_proxy(proxy)


def main(argv: list[str] | None = None) -> int:
    args = None
    try:
        args, extra = parse_args(sys.argv[1:] if argv is None else argv)
        return run(args, extra)
    except VespaError as exc:
        if args is not None and args.debug:
            traceback.print_exc()
        say(f"error: {exc.message}")
        if exc.hint:
            say(f"hint: {exc.hint}")
        # A malformed key is the caller's to fix, like a missing one.
        return 2 if isinstance(exc, (UsageError, BadKey)) else 1
    except (KeyboardInterrupt, EOFError):
        say("\nInterrupted.")
        return 130


if __name__ == "__main__":
    sys.exit(main())
