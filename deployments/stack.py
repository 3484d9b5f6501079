"""The local Prefect stack in one command: server, work pools, deployments and workers; and its teardown.

    python -m deployments.stack up                 # server on 127.0.0.1:4200, pools, prefect.yaml, 2 workers
    python -m deployments.stack up --serve         # server + `deployments/serve.py` instead of pools and workers
    python -m deployments.stack status
    python -m deployments.stack down               # workers (or serve) first, then the server

Everything lives under the state folder (default `.alignflow-stack/`, or `--state DIR`):
`prefect-home/` (PREFECT_HOME), `prefect.db` (the server's SQLite database), `logs/*.log` (each
process's output), `pids/*.pid`, and `stack.json` (the API URL). Runs write to ALIGNFLOW_HOME when it is
set, else to `<state>/alignflow-home`. Open the UI at the printed URL.

`down` stops the processes by the PIDs in `pids/`, in order: the workers (or the serve process)
get SIGTERM first, so that they stop polling and mark their runs, and only then the server, which
they report to while shutting down. A process that does not stop in time gets SIGKILL.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from storage.errors import AlignflowError

ROOT = Path(__file__).resolve().parents[1]
PREFECT_FILE = Path("deployments") / "prefect.yaml"
CPU_POOL = "alignflow-cpu"
GPU_POOL = "alignflow-gpu"
# Stop order: everything that talks to the server first, the server last.
STOP_ORDER = ("worker-gpu", "worker-cpu", "serve", "server")


class StackError(AlignflowError, RuntimeError):
    """The stack could not be brought up (a process died or the server did not answer)."""


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def stack_env(state: Path, api_url: str, base: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of every stack process and client: this server, this database, no analytics."""
    env = dict(os.environ if base is None else base)
    env.update(
        PREFECT_HOME=str(state / "prefect-home"),
        PREFECT_API_URL=api_url,
        PREFECT_API_DATABASE_CONNECTION_URL=f"sqlite+aiosqlite:///{state / 'prefect.db'}",
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        PREFECT_UI_API_URL=api_url,
    )
    env.pop("PREFECT_API_KEY", None)  # a Cloud key must not be sent to a local server
    env.setdefault("ALIGNFLOW_HOME", str(state / "alignflow-home"))
    env.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "transformers,trl,accelerate")
    env["PYTHONUNBUFFERED"] = "1"  # the log files fill as things happen, and nothing is lost on SIGTERM
    return env


def _parent_death_signal():
    """A pre-exec hook (Linux): the child gets SIGTERM when its parent dies, so a killed test run
    leaves no server behind. libc is loaded here, in the parent; the child only makes the call."""
    import ctypes

    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    pr_set_pdeathsig = 1
    return lambda: libc.prctl(pr_set_pdeathsig, signal.SIGTERM)


def start_process(name: str, args: list[str], state: Path, env: dict[str, str], die_with_parent: bool = False) -> subprocess.Popen:
    """Start a stack process with its output in logs/<name>.log and its PID in pids/<name>.pid."""
    (state / "logs").mkdir(parents=True, exist_ok=True)
    (state / "pids").mkdir(parents=True, exist_ok=True)
    preexec = _parent_death_signal() if die_with_parent and sys.platform == "linux" else None
    with open(state / "logs" / f"{name}.log", "ab") as log:
        process = subprocess.Popen(args, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                   preexec_fn=preexec)
    (state / "pids" / f"{name}.pid").write_text(str(process.pid))
    return process


def wait_healthy(api_url: str, process: subprocess.Popen | None = None, timeout: float = 180.0) -> None:
    """Wait until GET <api>/health answers 200; fail early when the server process has died."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise StackError(f"the Prefect server exited with code {process.returncode} before it answered")
        try:
            with urllib.request.urlopen(f"{api_url}/health", timeout=5) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise StackError(f"the Prefect server at {api_url} did not answer /health within {timeout:.0f}s")


def start_server(state: Path, port: int, env: dict[str, str], host: str = "127.0.0.1", die_with_parent: bool = False) -> subprocess.Popen:
    prefect = str(Path(sys.executable).with_name("prefect"))
    return start_process("server", [prefect, "server", "start", "--host", host, "--port", str(port)], state, env, die_with_parent)


def create_work_pools(env: dict[str, str]) -> None:
    """Process-type pools: one for generation, one for training (GPU job variables: see prefect.yaml)."""
    prefect = str(Path(sys.executable).with_name("prefect"))
    for pool in (CPU_POOL, GPU_POOL):
        subprocess.run([prefect, "work-pool", "create", pool, "--type", "process", "--overwrite"],
                       cwd=ROOT, env=env, check=True, capture_output=True, text=True)


def deploy_all(state: Path, env: dict[str, str]) -> None:
    """`prefect deploy --all` from deployments/prefect.yaml (the pull step cds to this checkout)."""
    prefect = str(Path(sys.executable).with_name("prefect"))
    env = {**env, "ALIGNFLOW_PROJECT_DIR": str(ROOT)}
    with open(state / "logs" / "deploy.log", "ab") as log:
        result = subprocess.run([prefect, "--no-prompt", "deploy", "--all", "--prefect-file", str(PREFECT_FILE)],
                                cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    if result.returncode != 0:
        raise StackError(f"prefect deploy failed (exit {result.returncode}); see {state / 'logs' / 'deploy.log'}")


def up(state: Path, port: int | None = None, serve: bool = False, serve_args: list[str] | None = None,
       extra_env: dict[str, str] | None = None, die_with_parent: bool = False) -> dict[str, str]:
    """Bring the stack up; returns {"api_url", "ui_url", "state"}. Stops what it started if a step fails.

    extra_env goes into every process's environment after the stack's own settings (e.g. ALIGNFLOW_HOME).
    die_with_parent (tests): the processes get SIGTERM when the calling process dies, even when it is killed.
    """
    state = state.resolve()
    if any("running" in line for line in status(state).values()):
        raise StackError(f"{state} already holds a running stack ({status(state)}); run `down` first")
    down(state)  # clears stale PID files of processes that died
    port = port or free_port()
    api_url = f"http://127.0.0.1:{port}/api"
    env = {**stack_env(state, api_url), **(extra_env or {})}
    (state / "prefect-home").mkdir(parents=True, exist_ok=True)
    try:
        server = start_server(state, port, env, die_with_parent=die_with_parent)
        wait_healthy(api_url, server)
        if serve:
            start_process("serve", [sys.executable, "-m", "deployments.serve", *(serve_args or [])], state, env, die_with_parent)
        else:
            create_work_pools(env)
            deploy_all(state, env)
            prefect = str(Path(sys.executable).with_name("prefect"))
            for pool, name in ((CPU_POOL, "worker-cpu"), (GPU_POOL, "worker-gpu")):
                start_process(name, [prefect, "worker", "start", "--pool", pool, "--type", "process"], state, env, die_with_parent)
    except BaseException:
        down(state)
        raise
    info = {"api_url": api_url, "ui_url": f"http://127.0.0.1:{port}", "state": str(state)}
    (state / "stack.json").write_text(json.dumps(info, indent=2))
    return info


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie (exited, not yet reaped by its parent) counts as stopped.
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1][0] != "Z"
    except (OSError, IndexError):
        return True


def stop_pid(pid: int, timeout: float = 30.0) -> bool:
    """SIGTERM, wait, then SIGKILL. True when the process had to be killed."""
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return False
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not pid_alive(pid):
            return False
        time.sleep(0.2)
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        return False
    return True


def down(state: Path, timeout: float = 30.0) -> list[str]:
    """Stop the stack's processes by PID in STOP_ORDER; returns the names that were stopped."""
    stopped = []
    for name in STOP_ORDER:
        pid_file = state / "pids" / f"{name}.pid"
        if not pid_file.exists():
            continue
        pid = int(pid_file.read_text().strip())
        if pid_alive(pid):
            killed = stop_pid(pid, timeout)
            stopped.append(f"{name} (pid {pid}{', killed' if killed else ''})")
        pid_file.unlink()
    (state / "stack.json").unlink(missing_ok=True)
    return stopped


def status(state: Path) -> dict[str, str]:
    out = {}
    for name in STOP_ORDER:
        pid_file = state / "pids" / f"{name}.pid"
        if pid_file.exists():
            pid = int(pid_file.read_text().strip())
            out[name] = f"pid {pid} {'running' if pid_alive(pid) else 'dead'}"
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m deployments.stack", description=__doc__.split("\n\n")[0])
    parser.add_argument("command", choices=["up", "down", "status"])
    parser.add_argument("--state", type=Path, default=ROOT / ".alignflow-stack", help="Folder of the database, logs and PID files.")
    parser.add_argument("--port", type=int, default=4200, help="Server port on 127.0.0.1 (0: a free port).")
    parser.add_argument("--serve", action="store_true", help="Run deployments/serve.py instead of work pools and workers.")
    parser.add_argument("--defaults", type=Path, help="With --serve: JSON file of partial default configs by flow name.")
    args = parser.parse_args(argv)
    if args.command == "up":
        serve_args = ["--defaults", str(args.defaults.resolve())] if args.defaults else []
        try:
            info = up(args.state, args.port or None, serve=args.serve, serve_args=serve_args)
        except (StackError, subprocess.CalledProcessError) as err:
            print(f"error: {err}", file=sys.stderr)
            return 1
        print(f"Prefect UI: {info['ui_url']}\nexport PREFECT_API_URL={info['api_url']}\nlogs: {args.state.resolve() / 'logs'}")
    elif args.command == "down":
        stopped = down(args.state.resolve())
        print("stopped: " + (", ".join(stopped) if stopped else "nothing was running"))
    else:
        print(json.dumps(status(args.state.resolve()), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
