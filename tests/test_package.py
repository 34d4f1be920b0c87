"""Vespa as a user installs it: the wheel, the `vespa` command run from outside the checkout, and
the container image's entry command.

The wheel is built offline from a copy of the sources with this venv's setuptools, and installed
with `pip install --target` into a directory outside the checkout; its dependencies are the ones
this venv already has (installing them again would need the network). No Docker daemon runs
here, so the image itself is not built: its entry command runs as a plain process instead, with
the arguments `docker run IMAGE ARGS` would give it, and hadolint checks the Dockerfile.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import tomllib
import zipfile
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests
from packaging.requirements import Requirement

from vespa.emulator import Emulator, EmulatorConfig, EndpointConfig
from vespa.procs import free_port, stop, wait_for_port

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
KEY_VARS = ("VAST_ACCOUNT_KEY", "VAST_API_KEY", "VAST_ENDPOINT", "VAST_URL", "VAST_ACCOUNT_KEY_FILE",
            "VAST_API_KEY_FILE", "XDG_CONFIG_HOME", "XDG_CACHE_HOME", "PYTHONPATH")


def requirements(lines: list[str]) -> set[str]:
    """Normalised, so `a>=1 ; python_version<"3.12"` and `a >= 1; python_version < "3.12"` compare equal."""
    return {str(Requirement(line)) for line in lines}


def requirement_file(path: Path) -> list[str]:
    stripped = (line.split("#", 1)[0].strip() for line in path.read_text().splitlines())
    return [line for line in stripped if line]


def test_requirements_txt_lists_exactly_the_package_dependencies() -> None:
    """One source of truth: scripts/run.sh installs requirements.txt, pip install . the pyproject list."""
    assert requirements(requirement_file(REPO / "requirements.txt")) == requirements(
        PYPROJECT["project"]["dependencies"]
    )


# --- the wheel, installed outside the checkout ----------------------------------------------------
@dataclass(frozen=True)
class Installed:
    wheel: Path
    site: Path  # the --target directory: the package, vespa_addon.py, and bin/vespa

    def env(self, home: Path, **extra: str) -> dict[str, str]:
        """A user's environment: the installed package on the path, never the checkout."""
        env = {k: v for k, v in os.environ.items() if k not in KEY_VARS}
        return env | {"HOME": str(home), "PYTHONPATH": str(self.site),
                      "PATH": f"{self.site / 'bin'}:{env.get('PATH', '')}", "PYTHONUNBUFFERED": "1"} | extra


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Installed:
    tmp = tmp_path_factory.mktemp("pkg")
    src = tmp / "src"  # a copy, so the build leaves no build/ or *.egg-info in the checkout
    src.mkdir()
    for name in ("pyproject.toml", "README.md", "vespa_addon.py"):
        shutil.copy2(REPO / name, src / name)
    shutil.copytree(REPO / "vespa", src / "vespa", ignore=shutil.ignore_patterns("__pycache__"))
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    run = lambda *args: subprocess.run([*pip, *args], check=True, capture_output=True, timeout=120)  # noqa: E731
    run("wheel", "--no-deps", "--no-build-isolation", "--no-index", "--wheel-dir", str(tmp / "dist"), str(src))
    (wheel,) = (tmp / "dist").glob("vespa-*.whl")
    run("install", "--no-deps", "--no-index", "--target", str(tmp / "site"), str(wheel))
    return Installed(wheel, tmp / "site")


def test_wheel_declares_the_dependencies_and_the_command_and_holds_every_module(installed: Installed) -> None:
    with zipfile.ZipFile(installed.wheel) as whl:
        names = set(whl.namelist())
        info = next(n.split("/")[0] for n in names if n.endswith(".dist-info/METADATA"))
        metadata = whl.read(f"{info}/METADATA").decode()
        entry_points = whl.read(f"{info}/entry_points.txt").decode()
    requires = [line.split(":", 1)[1] for line in metadata.splitlines() if line.startswith("Requires-Dist:")]
    assert requirements(requires) == requirements(requirement_file(REPO / "requirements.txt"))
    assert re.search(r"^\[console_scripts\]\s*\nvespa\s*=\s*vespa\.cli\.launcher:main\s*$", entry_points, re.M)
    sources = {p.relative_to(REPO).as_posix() for p in (REPO / "vespa").rglob("*.py")} | {"vespa_addon.py"}
    assert sources <= names, sorted(sources - names)
    assert not {n for n in names if n.startswith(("tests/", "bench/", "scripts/"))}


def test_installed_package_imports_from_where_it_was_installed(installed: Installed, tmp_path: Path) -> None:
    code = "import vespa, vespa_addon, vespa.emulator; print(vespa.__file__); print(vespa_addon.__file__); print(vespa.VastClient.__name__)"
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=installed.env(tmp_path),
                         capture_output=True, text=True, timeout=60, check=True).stdout.split()
    assert Path(out[0]).is_relative_to(installed.site) and Path(out[1]).is_relative_to(installed.site)
    assert out[2] == "VastClient"
    help_run = subprocess.run([str(installed.site / "bin" / "vespa"), "--help"], cwd=tmp_path,
                              env=installed.env(tmp_path), capture_output=True, text=True, timeout=30)
    assert help_run.returncode == 0 and "--demo" in help_run.stdout and "--endpoint NAME" in help_run.stdout


def cmdline(pid: int) -> list[str]:
    return Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")[:-1]


def environ(pid: int) -> dict[str, str]:
    pairs = Path(f"/proc/{pid}/environ").read_bytes().decode().split("\0")
    return dict(pair.split("=", 1) for pair in pairs if "=" in pair)


def children(pid: int) -> list[int]:
    found = []
    for stat_file in Path("/proc").glob("[0-9]*/stat"):
        try:
            if int(stat_file.read_text().rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(stat_file.parent.name))
        except (OSError, ValueError, IndexError):
            continue
    return found


def stream_chat(base_url: str) -> str:
    body = {"model": "vespa-demo", "messages": [{"role": "user", "content": "Hello"}], "stream": True, "max_tokens": 4}
    with requests.post(f"{base_url}/v1/chat/completions", json=body, stream=True, timeout=30) as r:
        assert r.status_code == 200, r.text
        return "".join(chunk.decode() for chunk in r.iter_content(chunk_size=None))


def test_installed_vespa_command_runs_the_demo_with_the_installed_addon(installed: Installed, tmp_path: Path) -> None:
    port = free_port()
    proc = subprocess.Popen([str(installed.site / "bin" / "vespa"), "--demo", "--port", str(port)],
                            cwd=tmp_path, env=installed.env(tmp_path), stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_for_port(port, proc, timeout=40)
        (mitm,) = [pid for pid in children(proc.pid) if "mitmdump" in " ".join(cmdline(pid))]
        args = cmdline(mitm)
        # The addon comes from the installed package, not from a checkout.
        assert args[args.index("-s") + 1] == str(installed.site / "vespa_addon.py")
        assert "data: [DONE]" in stream_chat(f"http://127.0.0.1:{port}")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0
    finally:
        stop(proc)
    out = proc.stdout.read()
    assert f"curl --no-buffer http://127.0.0.1:{port}/v1/chat/completions" in out, out


# --- the container image's entry command ----------------------------------------------------------
def dockerfile() -> str:
    return (REPO / "Dockerfile").read_text()


def instruction(name: str) -> str:
    """The last stage's instruction, continuation lines joined."""
    text = dockerfile().replace("\\\n", " ")
    return re.findall(rf"^{name}\s+(.*)$", text, re.M)[-1]


def entrypoint() -> list[str]:
    """ENTRYPOINT, with its script replaced by the checkout's copy that the Dockerfile COPYs."""
    argv = json.loads(instruction("ENTRYPOINT"))
    copies = dict(reversed(line.split()[1:3]) for line in re.findall(r"^COPY (?!--from).*$", dockerfile(), re.M))
    return [str(REPO / copies[f"/usr/local/bin/{argv[0]}"]), *argv[1:]]


def healthcheck() -> list[str]:
    """The HEALTHCHECK as written: it must find the port itself, from the container's VESPA_PORT."""
    argv = json.loads(instruction("HEALTHCHECK").split(" CMD ", 1)[1])
    return [sys.executable if a == "python" else a for a in argv]


def test_dockerfile_is_a_slim_non_root_image_publishing_the_proxy_on_all_interfaces() -> None:
    assert re.findall(r"^FROM (\S+)", dockerfile(), re.M)[-1] == "python:3.13-slim"
    user = instruction("USER").split(":")[0]
    assert user.isdigit() and int(user) != 0
    assert entrypoint()[1:] == ["--host", "0.0.0.0"]
    assert "VESPA_PORT=8010" in instruction("ENV").split()
    assert "/_vespa/health" in instruction("HEALTHCHECK")
    # Everything the image COPYs from the build context passes .dockerignore.
    kept = {line[1:].rstrip("/") for line in (REPO / ".dockerignore").read_text().splitlines() if line.startswith("!")}
    for line in re.findall(r"^COPY (?!--from)(.*)$", dockerfile(), re.M):
        for source in line.split()[:-1]:
            assert source.rstrip("/") in kept and (REPO / source).exists(), source


def test_dockerfile_passes_hadolint() -> None:
    done = subprocess.run([str(BIN / "hadolint"), str(REPO / "Dockerfile")], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr


def test_container_entry_serves_with_the_account_key_from_a_secret_file(installed: Installed, tmp_path: Path) -> None:
    with contextlib.ExitStack() as emulator:
        vast = emulator.enter_context(Emulator(EmulatorConfig(endpoints=[EndpointConfig(name="team-llm")])))
        run_container_entry(installed, vast, emulator, tmp_path)


def run_container_entry(installed: Installed, vast: Emulator, emulator: contextlib.ExitStack, tmp_path: Path) -> None:
    secret = tmp_path / "vast_account_key"
    secret.write_text(vast.config.account_key + "\n")
    secret.chmod(0o600)
    port = free_port()
    env = installed.env(tmp_path, VAST_ENDPOINT="team-llm", VAST_ACCOUNT_KEY_FILE=str(secret), VAST_URL=vast.console_url,
                        VESPA_PORT=str(port))
    # As `docker run -e VESPA_PORT=N IMAGE ARGS`, which appends ARGS to ENTRYPOINT; the last --host
    # wins, so the test listens on loopback and a free port instead of the image's 0.0.0.0:8010.
    argv = [*entrypoint(), "--autoscaler-url", vast.autoscaler_url, "--host", "127.0.0.1"]
    proc = subprocess.Popen(argv, cwd=tmp_path, env=env, stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_for_port(port, proc, timeout=40)
        # The entry script and the launcher exec: the container's PID 1 is mitmdump itself.
        args, child_env = cmdline(proc.pid), environ(proc.pid)
        assert "mitmdump" in [Path(a).name for a in args[:2]], args  # [python, .../mitmdump, ...]
        assert not any(vast.config.account_key in a or vast.config.endpoints[0].api_key in a for a in args)
        assert child_env["VAST_API_KEY"] == vast.config.endpoints[0].api_key
        assert "VAST_ACCOUNT_KEY" not in child_env and "VAST_ACCOUNT_KEY_FILE" not in child_env
        assert "data: [DONE]" in stream_chat(f"http://127.0.0.1:{port}")
        # `docker exec` runs the HEALTHCHECK with the container's environment, VESPA_PORT included.
        assert subprocess.run(healthcheck(), env=env, timeout=10).returncode == 0
        emulator.close()
        # Unhealthy once the autoscaler is gone (after the health probe's 5 s cache).
        deadline = time.monotonic() + 15
        while subprocess.run(healthcheck(), env=env, capture_output=True, timeout=10).returncode == 0:
            assert time.monotonic() < deadline, "the healthcheck still passes with no autoscaler"
            time.sleep(0.5)
        proc.send_signal(signal.SIGTERM)  # what `docker stop` sends to PID 1
        assert proc.wait(timeout=15) == 0
    finally:
        stop(proc)
    out = proc.stdout.read()
    assert vast.config.account_key not in out and vast.config.endpoints[0].api_key not in out


@pytest.mark.parametrize("case", ["missing file", "both given"])
def test_container_entry_refuses_a_bad_secret_before_starting(installed: Installed, tmp_path: Path, case: str) -> None:
    env = installed.env(tmp_path, VAST_ENDPOINT="team-llm", VAST_ACCOUNT_KEY_FILE=str(tmp_path / "absent"))
    if case == "both given":
        (tmp_path / "absent").write_text("acct-key-from-file-0123")
        env["VAST_ACCOUNT_KEY"] = "acct-key-from-env-4567"
    done = subprocess.run(entrypoint(), cwd=tmp_path, env=env, stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 2
    assert done.stderr.startswith("error: ") and "\nhint: " in done.stderr
    assert "Starting proxy" not in done.stdout and "0123" not in done.stderr + done.stdout


@pytest.mark.parametrize("arg", [["--port", "9000"], ["--port=9000"], ["--por", "9000"]])
def test_container_entry_refuses_a_port_argument_the_healthcheck_would_not_follow(
        installed: Installed, tmp_path: Path, arg: list[str]) -> None:
    """`docker run IMAGE --port 9000` would listen where the HEALTHCHECK never looks: the
    container would turn unhealthy while it serves. The port is VESPA_PORT's, for both."""
    env = installed.env(tmp_path, VAST_ENDPOINT="team-llm", VAST_ACCOUNT_KEY="acct-0123456789abcdef")
    done = subprocess.run([*entrypoint(), *arg], cwd=tmp_path, env=env, stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 2
    assert done.stderr.startswith("error: ") and "VESPA_PORT" in done.stderr and "\nhint: " in done.stderr
    assert "Starting proxy" not in done.stdout


def test_container_entry_without_an_endpoint_fails_with_a_hint(installed: Installed, tmp_path: Path) -> None:
    """`docker run` without -it has no terminal to ask in: a usage error, not a hang."""
    env = installed.env(tmp_path, VAST_ACCOUNT_KEY="acct-0123456789abcdef")
    done = subprocess.run(entrypoint(), cwd=tmp_path, env=env, stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 2
    assert "error: no endpoint name given" in done.stderr and "VAST_ENDPOINT" in done.stderr
