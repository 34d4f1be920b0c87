"""scripts/run.sh end to end: key sources, the console path, errors and hints, the interactive
mode in a real pseudo-terminal, and --demo streaming through a real mitmdump.

Most paths run `launcher.main()` in-process against an emulator, with `os.execve` caught so
no mitmdump starts; the rest run scripts/run.sh as a subprocess. Ports are picked at run time.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import socket
import stat
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import pexpect
import pytest

from tests.conftest import free_port, stop, wait_for_port
from vespa.cli import launcher
from vespa.emulator import Emulator, EmulatorConfig, EndpointConfig

REPO = Path(__file__).resolve().parents[1]
RUN_SH = REPO / "scripts" / "run.sh"
VAST_VARS = ("XDG_CONFIG_HOME", "VAST_ACCOUNT_KEY", "VAST_API_KEY", "VAST_ENDPOINT", "VAST_URL")




def children(pid: int) -> list[int]:
    found = []
    for stat_file in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError):
            fields = stat_file.read_text().rsplit(")", 1)[1].split()
            if int(fields[1]) == pid:
                found.append(int(stat_file.parent.name))
    return found


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def proc_file(pid: int, name: str) -> str:
    return Path(f"/proc/{pid}/{name}").read_bytes().replace(b"\0", b" ").decode()


def proc_environ(pid: int) -> dict[str, str]:
    pairs = Path(f"/proc/{pid}/environ").read_bytes().decode().split("\0")
    return dict(pair.split("=", 1) for pair in pairs if "=" in pair)


class Output:
    """A child's stdout read by a thread, so waiting for a line can time out instead of hanging."""

    def __init__(self, stream: IO[str]) -> None:
        self.lines: list[str] = []
        self.reader = threading.Thread(target=lambda: self.lines.extend(stream), daemon=True)
        self.reader.start()

    def until(self, last_line: str, timeout: float = 30.0) -> str:
        """Everything up to and including `last_line`."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            lines = list(self.lines)
            if any(line.rstrip("\n") == last_line for line in lines):
                return "".join(lines)
            if not self.reader.is_alive():
                break
            time.sleep(0.05)
        raise AssertionError(f"{last_line!r} never printed:\n" + "".join(self.lines))

    def all(self) -> str:
        self.reader.join(timeout=10)
        return "".join(self.lines)


def printed_examples(out: str) -> tuple[str, str]:
    """The curl command and the Python snippet the launcher prints after start, as a user would copy them."""
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.lstrip().startswith("curl "))
    curl = []
    for line in lines[start:]:
        curl.append(line.strip().removesuffix("\\"))
        if not line.endswith("\\"):
            break
    begin = next(i for i, line in enumerate(lines) if "python3 - <<'EOF'" in line) + 1
    end = lines.index("  EOF", begin)
    return " ".join(curl), textwrap.dedent("\n".join(lines[begin:end]))


@pytest.fixture(scope="module")
def vast() -> Iterator[Emulator]:
    config = EmulatorConfig(
        endpoints=[
            EndpointConfig(name="llm-prod", workers=1, max_workers=4),
            EndpointConfig(name="llm-staging", workers=1, state="stopped", max_workers=2),
        ],
        console_rate_limit=None,
        ttft_ms=5,
        tokens_per_s=1000.0,
    )
    with Emulator(config) as emu:
        yield emu


def ep_key(emu: Emulator, name: str = "llm-prod") -> str:
    return next(ep.api_key for ep in emu.config.endpoints if ep.name == name)


def secrets_of(emu: Emulator) -> list[str]:
    return [emu.config.account_key, *(ep.api_key for ep in emu.config.endpoints)]


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A clean HOME and no Vast variables, for this process and the ones it starts."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    for var in VAST_VARS:
        monkeypatch.delenv(var, raising=False)
    return home


def write_key(path: Path, value: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(value + "\n")
    path.chmod(0o600)


class Exec(Exception):
    def __init__(self, path: str, argv: list[str], env: dict[str, str]) -> None:
        self.path, self.argv, self.env = path, argv, env


@dataclass
class Result:
    rc: int | None  # None: the launcher got as far as starting mitmproxy
    out: str
    err: str
    exec: Exec | None


@pytest.fixture
def launch(home: Path, vast: Emulator, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture):
    """Run the launcher in-process against `vast`; starting mitmproxy is caught, not done."""

    def fake_execve(path: str, argv: list[str], env: dict[str, str]) -> None:
        raise Exec(path, argv, env)

    monkeypatch.setattr(launcher.os, "execve", fake_execve)

    def run(*argv: str, emu: Emulator = vast, urls: bool = True) -> Result:
        base = ["--console-url", emu.console_url, "--autoscaler-url", emu.autoscaler_url] if urls else []
        if "--port" not in argv:
            base += ["--port", str(free_port())]
        try:
            rc, started = launcher.main([*base, *argv]), None
        except Exec as e:
            rc, started = None, e
        out, err = capsys.readouterr()
        for secret in secrets_of(emu):
            assert secret not in out + err, "a key was printed in full"
        if started is not None:
            assert not any(secret in arg for arg in started.argv for secret in secrets_of(emu))
            assert "VAST_ACCOUNT_KEY" not in started.env
        return Result(rc, out, err, started)

    return run


# --- key sources and their priority -------------------------------------------------------------
def test_endpoint_key_from_flag(launch, vast: Emulator) -> None:
    calls = len(vast.records.console)
    r = launch("--endpoint", "llm-prod", "--api-key", ep_key(vast))
    assert r.exec.env["VAST_API_KEY"] == ep_key(vast)
    assert r.exec.env["VESPA_KEY_SOURCE"] == f"endpoint key from --api-key (...{ep_key(vast)[-4:]})"
    assert "visible to other local users in `ps`" in r.err
    assert len(vast.records.console) == calls  # an endpoint key needs no console call


def test_endpoint_key_and_name_from_env(launch, vast: Emulator, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VAST_API_KEY", ep_key(vast))
    monkeypatch.setenv("VAST_ENDPOINT", "llm-prod")
    r = launch()
    assert r.exec.env["VAST_API_KEY"] == ep_key(vast)
    assert r.exec.env["VESPA_KEY_SOURCE"].startswith("endpoint key from env VAST_API_KEY (...")
    assert "`ps`" not in r.err
    assert "vespa_endpoint=llm-prod" in r.exec.argv


def test_account_key_from_env_goes_through_the_console(launch, vast: Emulator, monkeypatch) -> None:
    monkeypatch.setenv("VAST_ACCOUNT_KEY", vast.config.account_key)
    calls = len(vast.records.console)
    r = launch("--endpoint", "llm-staging")
    assert r.exec.env["VAST_API_KEY"] == ep_key(vast, "llm-staging")
    assert r.exec.env["VESPA_KEY_SOURCE"] == (
        f"account key from env VAST_ACCOUNT_KEY (...{vast.config.account_key[-4:]}) via the console"
    )
    assert len(vast.records.console) == calls + 1


@pytest.mark.parametrize("where", ["xdg", "dot-config", "legacy"])
def test_account_key_from_key_files(launch, vast: Emulator, home: Path, monkeypatch, where: str) -> None:
    path = {
        "xdg": home / "xdg" / "vastai" / "vast_api_key",
        "dot-config": home / ".config" / "vastai" / "vast_api_key",
        "legacy": home / ".vast_api_key",
    }[where]
    if where == "xdg":
        monkeypatch.setenv("XDG_CONFIG_HOME", str(home / "xdg"))
    write_key(path, vast.config.account_key)
    r = launch("--endpoint", "llm-prod")
    assert r.exec.env["VAST_API_KEY"] == ep_key(vast)
    assert "account key from file" in r.exec.env["VESPA_KEY_SOURCE"]
    assert path.name in r.exec.env["VESPA_KEY_SOURCE"]


def test_priority_flag_over_env_over_file(launch, vast: Emulator, home: Path, monkeypatch) -> None:
    write_key(home / ".vast_api_key", "file-key-that-is-wrong-0000")
    monkeypatch.setenv("VAST_ENDPOINT", "no-such-endpoint")
    monkeypatch.setenv("VAST_API_KEY", ep_key(vast, "llm-staging"))
    # env endpoint key beats the file's account key; --endpoint beats VAST_ENDPOINT
    r = launch("--endpoint", "llm-staging")
    assert r.exec.env["VESPA_KEY_SOURCE"].startswith("endpoint key from env VAST_API_KEY")
    # a flag beats the environment: the account key flag wins over env VAST_API_KEY
    r = launch("--endpoint", "llm-prod", "--account-key", vast.config.account_key)
    assert r.exec.env["VAST_API_KEY"] == ep_key(vast)
    assert r.exec.env["VESPA_KEY_SOURCE"].startswith("account key from --account-key")


def test_a_loose_key_file_is_warned_about(launch, vast: Emulator, home: Path) -> None:
    write_key(home / ".vast_api_key", vast.config.account_key)
    (home / ".vast_api_key").chmod(0o644)
    r = launch("--endpoint", "llm-prod")
    assert r.exec is not None
    assert "warning: ~/.vast_api_key is readable by other users" in r.err


def test_mitmproxy_command_line(launch, vast: Emulator, tmp_path: Path) -> None:
    r = launch("--endpoint", "llm-prod", "--api-key", ep_key(vast), "--debug", "--port", "18099",
               "--", "-w", str(tmp_path / "flows"))
    auto = vast.autoscaler_url
    assert r.exec.path == r.exec.argv[0] == str(Path(sys.executable).parent / "mitmdump")
    assert r.exec.argv[1:] == [
        "-s", str(REPO / "vespa_addon.py"), "--mode", f"reverse:{auto}", "--listen-host", "127.0.0.1",
        "-p", "18099", "--set", "vespa_endpoint=llm-prod", "--set", f"vespa_autoscaler_url={auto}",
        "--set", f"vespa_console_url={vast.console_url}", "--set", "connection_strategy=lazy", "--set", "flow_detail=0", "--set", "termlog_verbosity=debug",
        "-w", str(tmp_path / "flows"),
    ]  # fmt: skip
    assert "Starting proxy for: llm-prod" in r.out and "Listening on: http://127.0.0.1:18099" in r.out
    r = launch("--endpoint", "llm-prod", "--api-key", ep_key(vast), "--web")
    assert r.exec.argv[0].endswith("/mitmweb")


def test_instances_and_vast_url(home: Path, monkeypatch) -> None:
    args, _ = launcher.parse_args(["--instance", "alpha"])
    assert launcher.service_urls(args) == launcher.Instance("https://run-alpha.vast.ai", "https://alpha.vast.ai")
    args, _ = launcher.parse_args(["--instance", "candidate"])
    assert launcher.service_urls(args) == launcher.Instance("https://run-candidate.vast.ai", "https://candidate.vast.ai")
    monkeypatch.setenv("VAST_URL", "https://console.example/")
    args, _ = launcher.parse_args([])
    assert launcher.service_urls(args) == launcher.Instance("https://run.vast.ai", "https://console.example")


def test_non_local_host_is_warned_about(launch, vast: Emulator) -> None:
    r = launch("--endpoint", "llm-prod", "--api-key", ep_key(vast), "--host", "0.0.0.0")
    assert "reachable from the network" in r.err
    assert r.exec.argv[r.exec.argv.index("--listen-host") + 1] == "0.0.0.0"


# --- --list -------------------------------------------------------------------------------------
def test_list_shows_a_table(launch, vast: Emulator) -> None:
    r = launch("--list", "--account-key", vast.config.account_key)
    assert r.rc == 0
    lines = r.out.splitlines()
    assert lines[0] == "Available endpoints (2):"
    assert lines[1].split() == ["NAME", "STATE", "MAX", "WORKERS"]
    assert lines[2].split() == ["llm-prod", "active", "4"]
    assert lines[3].split() == ["llm-staging", "stopped", "2"]


def test_list_explains_no_endpoints(launch, monkeypatch) -> None:
    with Emulator(EmulatorConfig(endpoints=[])) as empty:
        monkeypatch.setenv("VAST_ACCOUNT_KEY", empty.config.account_key)
        r = launch("--list", emu=empty)
    assert r.rc == 0
    assert "No endpoints found" in r.out
    assert "hint: create one at" in r.err and "not an endpoint key" in r.err


def test_list_needs_the_account_key(launch, vast: Emulator, monkeypatch) -> None:
    monkeypatch.setenv("VAST_API_KEY", ep_key(vast))
    r = launch("--list")
    assert r.rc == 2
    assert "error: --list needs your account key" in r.err
    assert "env VAST_API_KEY is read as an endpoint key" in r.err


# --- errors a user can cause --------------------------------------------------------------------
def test_unknown_endpoint_suggests_the_closest(launch, vast: Emulator, monkeypatch) -> None:
    monkeypatch.setenv("VAST_ACCOUNT_KEY", vast.config.account_key)
    r = launch("--endpoint", "llm-prd")
    assert r.rc == 1
    assert "error: endpoint 'llm-prd' not found; this account has: llm-prod, llm-staging" in r.err
    assert "hint: Did you mean 'llm-prod'?" in r.err
    assert "Traceback" not in r.err


def test_endpoint_key_given_as_account_key(launch, vast: Emulator) -> None:
    r = launch("--endpoint", "llm-prod", "--account-key", ep_key(vast))
    assert r.rc == 1
    assert "error: the Vast console rejected the account key" in r.err
    assert "is an endpoint key, pass it with --api-key" in r.err


def test_account_key_given_as_endpoint_key(launch, vast: Emulator, monkeypatch) -> None:
    monkeypatch.setenv("VAST_API_KEY", vast.config.account_key)  # the vastai CLI's meaning of it
    r = launch("--endpoint", "llm-prod")
    assert r.rc == 1
    assert "error: the autoscaler rejected the endpoint key from env VAST_API_KEY" in r.err
    assert "pass it with --account-key" in r.err and "here VAST_API_KEY means the endpoint key" in r.err


def test_console_429_is_retried_with_backoff(launch, monkeypatch) -> None:
    with Emulator(EmulatorConfig(endpoints=[EndpointConfig(name="llm-prod")], console_rate_limit=3.0)) as limited:
        monkeypatch.setenv("VAST_ACCOUNT_KEY", limited.config.account_key)
        for _ in range(5):
            assert launch("--list", emu=limited).rc == 0
        statuses = [c.status_code for c in limited.records.console]
    assert statuses.count(429) >= 1 and statuses.count(200) == 5


def test_port_in_use(launch, vast: Emulator) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        r = launch("--endpoint", "llm-prod", "--api-key", ep_key(vast), "--port", str(port))
    assert r.rc == 1
    assert f"error: port {port} on 127.0.0.1 is already in use" in r.err
    assert f"--port {port + 1}" in r.err


def test_unreachable_autoscaler_and_debug_traceback(launch, vast: Emulator) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    argv = ["--endpoint", "llm-prod", "--api-key", ep_key(vast), "--console-url", vast.console_url]
    r = launch(*argv, "--autoscaler-url", dead, urls=False)
    assert r.rc == 1
    assert "error: cannot reach the autoscaler" in r.err and "hint: " in r.err
    assert "Traceback" not in r.err
    r = launch(*argv, "--autoscaler-url", dead, "--debug", urls=False)
    assert r.rc == 1 and "Traceback" in r.err


def test_unreachable_console(launch, vast: Emulator) -> None:
    r = launch("--endpoint", "llm-prod", "--account-key", vast.config.account_key,
               "--autoscaler-url", vast.autoscaler_url, "--console-url", f"http://127.0.0.1:{free_port()}", urls=False)
    assert r.rc == 1
    assert "error: cannot reach the Vast console" in r.err and "VAST_URL" in r.err


@pytest.mark.parametrize(
    "argv, expected",
    [([], "no endpoint and no key given"), (["--endpoint", "x"], "no key for endpoint 'x'"),
     (["--api-key", "some-endpoint-key-1234"], "no endpoint name given")],
)
def test_missing_info_without_a_terminal_exits_2_promptly(home: Path, argv: list[str], expected: str) -> None:
    env = {**os.environ, "HOME": str(home)}
    start = time.monotonic()
    # stdin is a pipe left open: a launcher that waited for input would hang here.
    proc = subprocess.Popen([str(RUN_SH), *argv], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=env, text=True)
    try:
        proc.wait(timeout=10)
        out, err = proc.communicate()
    finally:
        stop(proc)
    assert proc.returncode == 2
    assert time.monotonic() - start < 5
    assert f"error: {expected}" in err and "\nhint: " in err and "Traceback" not in err


def test_help_shows_every_option_and_run_sh_is_quick(home: Path) -> None:
    start = time.monotonic()
    out = subprocess.run([str(RUN_SH), "--help"], capture_output=True, text=True, check=True).stdout
    assert time.monotonic() - start < 3  # venv already set up: no pip, just Python's start-up
    for option in ("--endpoint NAME", "--api-key KEY", "--account-key KEY", "--list", "--port PORT",
                   "--host HOST", "--autoscaler-url URL", "--console-url URL", "--instance",
                   "--debug", "--web", "--replay FILE", "--demo", "-- ARGS", "VAST_ENDPOINT", "VAST_API_KEY",
                   "VAST_ACCOUNT_KEY", "VAST_URL", "~/.vast_api_key", "(default: 8010)", "prod,alpha,candidate"):
        assert option in out, option


# --- interactive mode in a real pseudo-terminal -------------------------------------------------
# The child execs at once, so forking beside the emulator's thread is safe here.
@pytest.mark.filterwarnings("ignore:This process .* is multi-threaded:DeprecationWarning")
def in_terminal(args: list[str], env: dict[str, str]) -> tuple[pexpect.spawn, io.StringIO]:
    """The launcher in a pseudo-terminal, and the transcript of everything it printed."""
    child = pexpect.spawn(sys.executable, ["-m", "vespa.cli.launcher", *args],
                          env={**os.environ, "PYTHONPATH": str(REPO), **env}, cwd=str(REPO), encoding="utf-8",
                          timeout=15, dimensions=(40, 200))
    child.logfile_read = transcript = io.StringIO()
    return child, transcript


def test_interactive_mode(home: Path, vast: Emulator) -> None:
    port = free_port()
    child, transcript = in_terminal(["--console-url", vast.console_url, "--autoscaler-url", vast.autoscaler_url],
                                    {"HOME": str(home)})
    try:
        child.expect("Vespa - Interactive Setup")
        child.expect("Enter account API key: ")
        child.sendline(ep_key(vast))  # the wrong kind first: rejected, explained, asked again
        child.expect("hint: .*is an endpoint key, pass it with --api-key")
        child.expect("Enter account API key: ")
        child.sendline(vast.config.account_key)
        child.expect(r"Available endpoints \(2\):")
        child.expect(r"1\. llm-prod  \(active\)")
        child.expect(r"2\. llm-staging  \(stopped\)")
        child.expect(r"Select endpoint \(1-2 or a name\): ")
        child.sendline("3")
        child.expect("Please enter a number from 1 to 2 or an endpoint name.")
        child.expect(r"Select endpoint \(1-2 or a name\): ")
        child.sendline("llm-stagin")
        child.expect("Did you mean 'llm-staging'?")
        child.expect(r"Select endpoint \(1-2 or a name\): ")
        child.sendline("llm-staging")  # by name
        with socket.socket() as busy:
            busy.bind(("127.0.0.1", 0))
            busy.listen()
            child.expect(r"Local proxy port \[8010\]: ")
            child.sendline(str(busy.getsockname()[1]))
            child.expect("is in use; please pick another")
        child.expect(r"Local proxy port \[8010\]: ")
        child.sendline(str(port))
        child.expect("Successfully retrieved endpoint API key")
        child.expect(r"Save this account key to .*vast_api_key.* \[y/N\]: ")
        child.sendline("y")
        child.expect("Saved to")
        child.expect(f"Listening on: http://127.0.0.1:{port}")
        child.expect(f"curl --no-buffer http://127.0.0.1:{port}/v1/chat/completions")
        wait_for_port(port, timeout=20)
        # The launcher became mitmdump: the same process, with the endpoint key in its environment.
        assert "mitmdump" in proc_file(child.pid, "cmdline")
        assert proc_environ(child.pid)["VAST_API_KEY"] == ep_key(vast, "llm-staging")
    finally:
        child.kill(signal.SIGTERM)
        child.close(force=True)
    saved = home / ".config" / "vastai" / "vast_api_key"
    assert saved.read_text() == vast.config.account_key + "\n"
    assert stat.S_IMODE(saved.stat().st_mode) == 0o600
    for secret in secrets_of(vast):
        assert secret not in transcript.getvalue(), "a typed or fetched key was echoed"


# --- a real proxy, started by run.sh ------------------------------------------------------------
def test_run_sh_account_key_to_a_running_proxy(home: Path, vast: Emulator) -> None:
    port = free_port()
    env = {**os.environ, "HOME": str(home), "VAST_ACCOUNT_KEY": vast.config.account_key}
    proc = subprocess.Popen(
        [str(RUN_SH), "--endpoint", "llm-prod", "--port", str(port), "--console-url", vast.console_url,
         "--autoscaler-url", vast.autoscaler_url],
        env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        output = Output(proc.stdout)
        printed = output.until("  EOF")
        wait_for_port(port, proc)
        assert "mitmdump" in proc_file(proc.pid, "cmdline")  # exec'd: no parent left behind
        environ = proc_environ(proc.pid)
        assert environ["VAST_API_KEY"] == ep_key(vast) and "VAST_ACCOUNT_KEY" not in environ
        for secret in secrets_of(vast):
            assert secret not in proc_file(proc.pid, "cmdline")
        import requests

        resp = requests.post(f"http://127.0.0.1:{port}/v1/completions", json={"prompt": "hi", "max_tokens": 3},
                             timeout=20)
        assert resp.status_code == 200, resp.text
        # The examples printed at start work as printed: the curl, and the OpenAI snippet.
        assert f"Base URL: http://127.0.0.1:{port}" in printed
        curl, snippet = printed_examples(printed)
        done = subprocess.run(["bash", "-c", curl], capture_output=True, text=True, timeout=30)
        assert done.returncode == 0 and "data: [DONE]" in done.stdout, done.stderr
        done = subprocess.run([sys.executable, "-c", snippet], capture_output=True, text=True, timeout=30)
        assert done.returncode == 0 and done.stdout.strip(), done.stderr
    finally:
        stop(proc)
    out = output.all()
    assert f"Listening on: http://127.0.0.1:{port}" in out
    assert "Key: account key from env VAST_ACCOUNT_KEY (..." in out
    for secret in secrets_of(vast):
        assert secret not in out


# --- --demo -------------------------------------------------------------------------------------
def test_demo_end_to_end(home: Path) -> None:
    from openai import OpenAI

    port = free_port()
    account, endpoint = "demo-acct-secret-0123456789", "demo-endpoint-secret-9876543210"
    env = {**os.environ, "HOME": str(home), "VESPA_EMU_ACCOUNT_KEY": account, "VESPA_EMU_ENDPOINT_KEY": endpoint}
    env.pop("XDG_CACHE_HOME", None)  # so a worker CA left behind would be in the temporary HOME's ~/.cache
    proc = subprocess.Popen([str(RUN_SH), "--demo", "--port", str(port)], env=env, stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    kids: list[int] = []
    try:
        wait_for_port(port, proc, timeout=30)
        kids = children(proc.pid)
        mitm = [pid for pid in kids if "mitmdump" in proc_file(pid, "cmdline")]
        emulator = [pid for pid in kids if "vespa.emulator" in proc_file(pid, "cmdline")]
        assert len(mitm) == 1 and len(emulator) == 1, kids
        # The worker leg: keys on its stdin, never in arguments or environment. The port may open
        # a moment before mitmproxy has loaded the script that starts it.
        deadline = time.monotonic() + 10
        while not (legs := children(mitm[0])) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(legs) == 1 and "vespa.proxy.leg" in proc_file(legs[0], "cmdline")
        for pid in (proc.pid, *kids, *legs):
            assert account not in proc_file(pid, "cmdline") and endpoint not in proc_file(pid, "cmdline")
        leg_env = {k: v for k, v in proc_environ(legs[0]).items() if not k.startswith("VESPA_EMU_")}  # the test's own
        assert endpoint not in json.dumps(leg_env) and "VESPA_ENDPOINT_KEYS" not in leg_env
        # Two demo endpoints: their keys reach mitmdump in its environment only.
        assert json.loads(proc_environ(mitm[0])["VESPA_ENDPOINT_KEYS"])["vespa-demo"] == endpoint
        kids += legs

        client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="not-used", timeout=30, max_retries=0)
        assert {m.id for m in client.models.list()} == {"vespa-demo", "vespa-small"}
        stream = client.chat.completions.create(
            model="vespa-demo", messages=[{"role": "user", "content": "Hello!"}], stream=True, max_tokens=8
        )
        pieces = [c.choices[0].delta.content for c in stream if c.choices and c.choices[0].delta.content]
        assert len(pieces) >= 2 and "".join(pieces).strip()
        # The demo's workers are HTTPS: the proxy fetched the emulator's root CA to verify them,
        # into a cache of the run's own (each emulator run has a new CA: nothing to reuse later).
        run_cache = Path(proc_environ(mitm[0])["XDG_CACHE_HOME"])
        assert list((run_cache / "vespa" / "worker-ca").glob("127.0.0.1_*.pem"))
        assert list((run_cache / "vespa" / "worker-ca").glob("bundle-*.pem"))

        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0
        deadline = time.monotonic() + 5
        while any(alive(pid) for pid in kids) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not any(alive(pid) for pid in kids), "the emulator or mitmdump outlived the launcher"
        # Nothing piles up run after run: the run's cache went with it, and none was made in ~/.cache.
        assert not run_cache.exists()
        assert not (home / ".cache" / "vespa").exists()
    finally:
        stop(proc)
        for pid in kids:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)
    out = proc.stdout.read()
    assert f"curl --no-buffer http://127.0.0.1:{port}/v1/chat/completions" in out
    assert f'OpenAI(base_url="http://127.0.0.1:{port}/v1"' in out
    assert account not in out and endpoint not in out


# --- launcher polish: picker, --list in a terminal, hints, the demo's emulator --------------------
@pytest.mark.filterwarnings("ignore:This process .* is multi-threaded:DeprecationWarning")
def test_interactive_enter_picks_the_only_endpoint_and_bad_typed_keys_are_explained(
    home: Path, tmp_path: Path
) -> None:
    port = free_port()
    config_home = tmp_path / "cfg"  # XDG_CONFIG_HOME outside HOME: the key goes there, as vastai's does
    with Emulator(EmulatorConfig(endpoints=[EndpointConfig(name="solo", workers=1)], console_rate_limit=None)) as emu:
        child, transcript = in_terminal(["--console-url", emu.console_url, "--autoscaler-url", emu.autoscaler_url],
                                        {"HOME": str(home), "XDG_CONFIG_HOME": str(config_home)})
        try:
            child.expect("Enter account API key: ")
            child.sendline("SECRETMARKER pasted with a space")
            child.expect(r"error: the account key from the prompt has U\+0020 \(SPACE\) at character 13")
            child.expect("hint: ")
            child.expect("Enter account API key: ")
            child.sendline(emu.config.account_key)
            child.expect(r"1\. solo  \(active\)")
            child.expect(r"Select endpoint \(1 or its name\) \[solo\]: ")
            child.sendline("")  # Enter
            child.expect(r"Local proxy port \[8010\]: ")
            child.sendline(str(port))
            child.expect(f"Save this account key to {config_home}/vastai/vast_api_key for next time")
            child.sendline("y")
            child.expect(f"Listening on: http://127.0.0.1:{port}")
            wait_for_port(port, timeout=20)
            assert proc_environ(child.pid)["VAST_API_KEY"] == emu.config.endpoints[0].api_key
        finally:
            child.kill(signal.SIGTERM)
            child.close(force=True)
        assert (config_home / "vastai" / "vast_api_key").read_text() == emu.config.account_key + "\n"
        assert "SECRETMARKER" not in transcript.getvalue()
        assert emu.config.account_key not in transcript.getvalue()


@pytest.mark.filterwarnings("ignore:This process .* is multi-threaded:DeprecationWarning")
def test_list_asks_for_the_account_key_in_a_terminal(home: Path, vast: Emulator) -> None:
    child, transcript = in_terminal(["--list", "--console-url", vast.console_url],
                                    {"HOME": str(home), "VAST_API_KEY": ep_key(vast)})
    try:
        child.expect("note: The key in env VAST_API_KEY is read as an endpoint key")
        child.expect("Enter account API key: ")
        child.sendline(vast.config.account_key)
        child.expect(r"Available endpoints \(2\):")
        child.expect(r"llm-prod +active +4")
        child.expect(r"llm-staging +stopped +2")
        child.expect(r"Save this account key to .*vast_api_key.* \[y/N\]: ")
        child.sendline("")
        child.expect(pexpect.EOF)
    finally:
        child.close(force=True)
    assert child.exitstatus == 0
    assert not (home / ".config" / "vastai" / "vast_api_key").exists()
    for secret in secrets_of(vast):
        assert secret not in transcript.getvalue()


def test_hints_name_the_key_file_actually_used(launch, vast: Emulator, tmp_path: Path, monkeypatch) -> None:
    r = launch("--endpoint", "x")
    assert r.rc == 2 and "~/.config/vastai/vast_api_key" in r.err
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "cfg"))
    used = f"{tmp_path}/cfg/vastai/vast_api_key"
    r = launch("--endpoint", "x")
    assert r.rc == 2 and f"in {used} (chmod 600)" in r.err and "~/.config" not in r.err
    r = launch("--list")
    assert r.rc == 2 and f"save it in {used}" in r.err and "~/.config" not in r.err
    r = launch("--endpoint", "llm-prod", "--api-key", ep_key(vast))
    assert f"or the key file {used}." in r.err
    help_text = launcher.build_parser().format_help()
    assert used in help_text and "~/.config" not in help_text


def test_examples_are_printed_after_every_start(launch, vast: Emulator) -> None:
    r = launch("--endpoint", "llm-prod", "--api-key", ep_key(vast), "--port", "18097")
    assert "Base URL: http://127.0.0.1:18097" in r.out
    curl, snippet = printed_examples(r.out)
    assert curl.startswith("curl --no-buffer http://127.0.0.1:18097/v1/chat/completions ")
    assert 'OpenAI(base_url="http://127.0.0.1:18097/v1"' in snippet
    compile(snippet, "snippet", "exec")  # it is Python as printed (it runs in the run.sh test)


def test_demo_stops_when_its_emulator_dies(home: Path) -> None:
    port = free_port()
    env = {**os.environ, "HOME": str(home)}
    proc = subprocess.Popen([str(RUN_SH), "--demo", "--port", str(port)], env=env, stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    kids: list[int] = []
    try:
        wait_for_port(port, proc, timeout=30)
        kids = children(proc.pid)
        emulator = [pid for pid in kids if "vespa.emulator" in proc_file(pid, "cmdline")]
        assert len(emulator) == 1, kids
        os.kill(emulator[0], signal.SIGKILL)
        assert proc.wait(timeout=10) == 1
        out = proc.stdout.read()
    finally:
        stop(proc)
    assert "error: the demo emulator exited (status -9); the proxy was stopped" in out
    assert "hint: Start the demo again" in out
    assert not any(alive(pid) for pid in kids), "mitmdump outlived its emulator"
    with socket.socket() as s:
        assert s.connect_ex(("127.0.0.1", port)) != 0, "the proxy still listens"


# --- malformed keys through scripts/run.sh: refused, and never printed, --debug included ----------
SECRET = "SECRETMARKER0123456789abcdef"


@pytest.mark.parametrize(
    "case, argv, env_extra, key_file, expected",
    [
        ("endpoint key env, 2 lines", [], {"VAST_API_KEY": f"{SECRET}\nx"}, None,
         "error: the endpoint key from env VAST_API_KEY has 2 lines"),
        ("account key env, BOM", [], {"VAST_ACCOUNT_KEY": f"\ufeff{SECRET}"}, None,
         "error: the account key from env VAST_ACCOUNT_KEY starts with a byte-order mark"),
        ("flag, newline", ["--api-key", f"{SECRET}\n"], {}, None, None),  # stripped: a fine key
        ("flag, inner newline", ["--account-key", f"{SECRET}\nx"], {}, None,
         "error: the account key from --account-key has 2 lines"),
        ("key file, comment", [], {}, f"# my key\n{SECRET}\n".encode(),
         "error: the account key from file {path} has 2 lines; a key is one line (line 1 is a comment"),
        ("key file, BOM", [], {}, f"\ufeff{SECRET}\n".encode(),
         "error: the account key from file {path} starts with a byte-order mark"),
        ("key file, non-latin-1", [], {}, f"{SECRET}\u2019\n".encode(),
         "error: the account key from file {path} has U+2019 (RIGHT SINGLE QUOTATION MARK)"),
        ("key file, not UTF-8", [], {}, SECRET.encode() + b"\xe9\n",
         "error: the account key from file {path} is not UTF-8 text"),
    ],
)
def test_malformed_keys_are_refused_and_never_printed(
    home: Path, vast: Emulator, tmp_path: Path, case: str, argv: list[str], env_extra: dict,
    key_file: bytes | None, expected: str | None,
) -> None:
    config_home = tmp_path / "cfg"
    path = config_home / "vastai" / "vast_api_key"
    if key_file is not None:
        path.parent.mkdir(parents=True)
        path.write_bytes(key_file)
        path.chmod(0o600)
    env = {**os.environ, "HOME": str(home), "XDG_CONFIG_HOME": str(config_home), **env_extra}
    done = subprocess.run(
        [str(RUN_SH), "--debug", "--endpoint", "llm-prod", "--port", str(free_port()),
         "--console-url", vast.console_url, "--autoscaler-url", vast.autoscaler_url, *argv],
        env=env, stdin=subprocess.DEVNULL, capture_output=True, timeout=30,
    )
    out, err = done.stdout.decode(errors="replace"), done.stderr.decode(errors="replace")
    assert "SECRETMARKER" not in out + err, case
    assert "0123456789" not in out + err, case
    if expected is None:  # the key was usable as given, and wrong: the autoscaler said so
        assert done.returncode == 1 and "error: the autoscaler rejected the endpoint key from --api-key" in err
        return
    assert done.returncode == 2, err
    assert expected.format(path=path) in err, err
    assert "\nhint: " in err
    assert "InvalidHeader" not in err and "UnicodeEncodeError" not in err


def test_a_malformed_key_from_the_console_is_refused(launch) -> None:
    odd = EmulatorConfig(endpoints=[EndpointConfig(name="odd", api_key=f"{SECRET}\nsecond")], console_rate_limit=None)
    with Emulator(odd) as emu:
        r = launch("--endpoint", "odd", "--account-key", emu.config.account_key, "--debug", emu=emu)
    assert r.rc == 2 and r.exec is None
    assert "error: the endpoint key from the console's answer for endpoint 'odd' has 2 lines" in r.err
    assert "hint: This is on Vast's side" in r.err
    assert "SECRETMARKER" not in r.out + r.err


def test_a_distinctive_key_never_reaches_the_debug_log(home: Path) -> None:
    """A valid key through the whole path (console, preflight, mitmdump --debug, requests)."""
    account, endpoint = f"acct-{SECRET}", f"ep-{SECRET}"
    config = EmulatorConfig(account_key=account, endpoints=[EndpointConfig(name="secret-ep", api_key=endpoint)],
                            console_rate_limit=None, ttft_ms=5, tokens_per_s=1000.0)
    port = free_port()
    with Emulator(config) as emu:
        env = {**os.environ, "HOME": str(home), "VAST_ACCOUNT_KEY": account}
        proc = subprocess.Popen(
            [str(RUN_SH), "--debug", "--endpoint", "secret-ep", "--port", str(port),
             "--console-url", emu.console_url, "--autoscaler-url", emu.autoscaler_url],
            env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        try:
            wait_for_port(port, proc)
            import requests

            ok = requests.post(f"http://127.0.0.1:{port}/v1/completions", json={"prompt": "hi", "max_tokens": 3},
                               timeout=20)
            assert ok.status_code == 200, ok.text
            bad = requests.post(f"http://127.0.0.1:{port}/v1/completions", data=b"{not json", timeout=20,
                                headers={"Content-Type": "application/json"})
            assert bad.status_code == 400
            assert "SECRETMARKER" not in ok.text + bad.text
        finally:
            stop(proc)
        out = proc.stdout.read()
    assert "Starting proxy for: secret-ep" in out
    assert "client connect" in out  # mitmproxy's debug-level lines: --debug reached it
    assert "SECRETMARKER" not in out


# --- several endpoints (issue 13) -----------------------------------------------------------------
def test_several_endpoints_one_console_call_keys_in_env_only(launch, vast: Emulator, monkeypatch) -> None:
    monkeypatch.setenv("VAST_ACCOUNT_KEY", vast.config.account_key)
    calls = len(vast.records.console)
    r = launch("--endpoint", "llm-prod", "--endpoint", "llm-staging", "--cost", "auto")
    assert len(vast.records.console) == calls + 1  # every endpoint key from one list call
    assert json.loads(r.exec.env["VESPA_ENDPOINT_KEYS"]) == {
        "llm-prod": ep_key(vast), "llm-staging": ep_key(vast, "llm-staging")}
    assert "VAST_API_KEY" not in r.exec.env
    argv = " ".join(r.exec.argv)
    assert "vespa_endpoint=llm-prod,llm-staging" in argv and "vespa_default_cost=auto" in argv
    assert "Starting proxy for: llm-prod, llm-staging" in r.out


def test_all_endpoints_and_config(launch, vast: Emulator, monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setenv("VAST_ACCOUNT_KEY", vast.config.account_key)
    r = launch("--all-endpoints")
    assert set(json.loads(r.exec.env["VESPA_ENDPOINT_KEYS"])) == {"llm-prod", "llm-staging"}
    config = tmp_path / "eps.toml"
    config.write_text('[[endpoint]]\nname = "llm-prod"\naliases = ["big"]\napi_key_env = "KEY_PROD"\n'
                      '[[endpoint]]\nname = "llm-staging"\n')
    monkeypatch.setenv("KEY_PROD", ep_key(vast))
    r = launch("--config", str(config))
    assert f"vespa_config={config.resolve()}" in r.exec.argv
    assert json.loads(r.exec.env["VESPA_ENDPOINT_KEYS"]) == {
        "llm-prod": ep_key(vast), "llm-staging": ep_key(vast, "llm-staging")}
    config.write_text('[[endpoint]]\nname = "llm-prod"\ncolour = "red"\n')
    r = launch("--config", str(config))
    assert r.rc != 0 and "colour" in r.err and "eps.toml" in r.err and "hint:" in r.err


def test_several_endpoints_need_the_account_key(launch, vast: Emulator) -> None:
    r = launch("--endpoint", "llm-prod", "--endpoint", "llm-staging")
    assert r.rc == 2 and "account key" in r.err


def test_cost_auto_for_one_endpoint_reaches_the_addon(launch, vast: Emulator, monkeypatch) -> None:
    monkeypatch.setenv("VAST_ACCOUNT_KEY", vast.config.account_key)
    r = launch("--endpoint", "llm-prod", "--cost", "auto")
    assert "vespa_default_cost=auto" in r.exec.argv and "vespa_endpoint=llm-prod" in r.exec.argv
    r = launch("--endpoint", "llm-prod", "--cost", "-2")
    assert r.rc != 0 and "--cost" in r.err
