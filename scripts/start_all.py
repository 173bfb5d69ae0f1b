"""One command for a local pool: redis-server (when REDIS_URL is unset), manager, worker,
router, and a registered demo model. Ctrl-C stops everything it started. With ``--node``,
worker and router run as one process (services.node): one hop fewer per request.

Run through scripts/start_all.sh, which prepares the virtual environment first.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

from services.worker.gpu import open_inventory
from shared import procs

ROOT = Path(__file__).resolve().parent.parent
RUN = Path(os.environ.get("SVLLM_RUN_DIR", ROOT / ".run"))


def port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def wait_http(url: str, proc: subprocess.Popen[bytes], log: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            sys.exit(f"{url} exited with code {proc.returncode}; last log lines:\n"
                     f"{procs.tail(log)}")
        try:
            if httpx.get(url, timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    sys.exit(f"{url} not healthy after {timeout:.0f}s; see {log}")


TOKENS = ("ADMIN_TOKEN", "INTERNAL_TOKEN", "API_TOKEN")


def load_tokens(path: Path) -> dict[str, str]:
    """The pool's tokens, generated on the first run and kept in ``path`` (mode 0600) so that
    clients keep working across restarts. A token set in the environment wins, and is then
    what ``path`` holds too: the file is what users source, so it must hold the tokens in
    use (a generated one beside a different one in use gave 401 to whoever sourced it)."""
    saved: dict[str, str] = {}
    if path.exists():
        for line in path.read_text().splitlines():
            name, _, value = line.partition("=")
            if name in TOKENS and value:
                # Quoted as a shell reads it: users source the file (`set -a; . FILE`).
                saved[name] = "".join(shlex.split(value))
    in_use = {n: os.environ.get(n) or saved.get(n) or secrets.token_urlsafe(32)
              for n in TOKENS}
    if in_use != saved:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        os.fchmod(fd, 0o600)  # an existing file keeps its mode through O_CREAT
        with os.fdopen(fd, "w") as f:
            # A token from the environment may hold what a shell would run ($, `, ;).
            f.writelines(f"{n}={shlex.quote(in_use[n])}\n" for n in TOKENS)
        generated = [n for n in TOKENS if n not in saved and not os.environ.get(n)]
        taken = [n for n in TOKENS if os.environ.get(n) and os.environ[n] != saved.get(n)]
        if generated:
            print(f"  generated {', '.join(generated)} in {path} (mode 0600)")
        if taken:
            print(f"  wrote {', '.join(taken)} from the environment to {path}")
    os.chmod(path, 0o600)
    return in_use


def choose_engine() -> tuple[str, str]:
    """(engine, why). The simulated engine is chosen only when vLLM or a GPU is missing, and
    the choice is printed, never silent."""
    gpus, message = open_inventory(os.environ.get("GPU_BACKEND", "nvml")).read()
    has_vllm = importlib.util.find_spec("vllm") is not None or shutil.which("vllm") is not None
    if gpus and has_vllm:
        return "vllm", f"{len(gpus)} GPU(s) and vLLM found"
    missing = message or "no GPU" if not gpus else "vLLM is not installed"
    return "sim", f"{missing}: using the SIMULATED engine"


class Stack:
    """The processes started, with their logs under ``run_dir`` (default: the pool's)."""

    def __init__(self, run_dir: Path = RUN) -> None:
        self.run = run_dir
        self.children: list[tuple[str, subprocess.Popen[bytes]]] = []
        (self.run / "logs").mkdir(parents=True, exist_ok=True)

    def start(self, name: str, argv: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
        log = self.run / "logs" / f"{name}.log"
        proc = procs.spawn(argv, log_path=log, env=env, cwd=ROOT)
        self.children.append((name, proc))
        print(f"  started {name} (pid {proc.pid}, log {log})", flush=True)
        return proc

    def stop(self) -> None:
        for name, proc in reversed(self.children):
            procs.stop(proc, grace_s=20)
            print(f"  stopped {name}")


def start_redis(stack: Stack, port: int | None = None) -> str:
    """A redis-server on ``port`` (default ``SVLLM_REDIS_PORT``, else 6380), its data under
    the stack's run directory."""
    binary = shutil.which("redis-server")
    if binary is None:
        sys.exit("redis-server not found: install it (apt-get install redis-server) "
                 "or set REDIS_URL")
    if port is None:
        port = int(os.environ.get("SVLLM_REDIS_PORT", "6380"))
    if not port_free(port):
        sys.exit(f"port {port} is taken: set SVLLM_REDIS_PORT or REDIS_URL")
    data = stack.run / "redis"
    data.mkdir(parents=True, exist_ok=True)
    # AOF on: registered models survive a restart of the whole stack.
    argv = [binary, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(data),
            "--appendonly", "yes", "--save", ""]
    proc = stack.start("redis", argv, dict(os.environ))
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5) as s:
                s.sendall(b"PING\r\n")
                if s.recv(16).startswith(b"+PONG"):
                    return f"redis://127.0.0.1:{port}/0"
        except OSError:
            time.sleep(0.1)
    sys.exit(f"redis-server did not start; see {stack.run / 'logs' / 'redis.log'}")


def register_demo(router: str, engine: str, headers: dict[str, str]) -> str:
    alias = os.environ.get("DEMO_ALIAS", "demo")
    default_model = "Qwen/Qwen2.5-0.5B-Instruct" if engine == "vllm" else "sim/demo-model"
    body = {"alias": alias, "model_name": os.environ.get("DEMO_MODEL", default_model),
            "engine": engine}
    r = httpx.post(f"{router}/admin/models/register", json=body, headers=headers, timeout=10)
    if r.status_code >= 400:
        sys.exit(f"registering the demo model failed: {r.status_code} {r.text}")
    return alias


def wait_serving(router: str, alias: str, api_token: str, timeout: float) -> bool:
    body = {"model": alias, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}
    headers = {"authorization": f"Bearer {api_token}"}
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.post(f"{router}/v1/chat/completions", json=body, headers=headers,
                          timeout=30).is_success:
                return True
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    return False


def print_examples(router: str, alias: str, tokens_file: Path) -> None:
    print(f"""
The pool is up. Its tokens are in {tokens_file} (mode 0600): API_TOKEN for /v1,
ADMIN_TOKEN for /admin. Try:

  set -a; . {tokens_file}; set +a

  curl -s {router}/v1/chat/completions -H "authorization: Bearer $API_TOKEN" \\
    -H 'content-type: application/json' \\
    -d '{{"model": "{alias}", "messages": [{{"role": "user", "content": "Hello!"}}]}}'

  python - <<'PY'
  import os
  from openai import OpenAI
  client = OpenAI(base_url="{router}/v1", api_key=os.environ["API_TOKEN"])
  for chunk in client.chat.completions.create(model="{alias}", stream=True,
          messages=[{{"role": "user", "content": "Hello!"}}]):
      print(chunk.choices[0].delta.content or "", end="", flush=True)
  PY

  curl -s {router}/admin/status -H "authorization: Bearer $ADMIN_TOKEN"   # workers, models
Press Ctrl-C to stop everything.""", flush=True)


def run(stack: Stack, node: bool = False) -> None:
    env = dict(os.environ)
    tokens_file = RUN / "tokens.env"
    tokens = load_tokens(tokens_file)
    env |= tokens
    env.setdefault("LOG_FORMAT", "text")
    if "REDIS_URL" not in env:
        env["REDIS_URL"] = start_redis(stack)
    engine, why = choose_engine()
    print(f"  engine for the demo model: {engine} ({why})")
    env.setdefault("DEFAULT_ENGINE", engine)
    env.setdefault("WORKER_ID", socket.gethostname())
    ports = {s: env.setdefault(f"{s.upper()}_PORT", p)
             for s, p in (("manager", "9000"), ("worker", "7000"), ("router", "8000"))}
    env.setdefault("WORKER_URL", f"http://127.0.0.1:{ports['worker']}")
    for name in ("manager", "worker", "router"):
        if not port_free(int(ports[name])):
            sys.exit(f"port {ports[name]} for the {name} is taken: set {name.upper()}_PORT")
    for name in ("manager", "node") if node else ("manager", "worker", "router"):
        proc = stack.start(name, [sys.executable, "-m", f"services.{name}.main"], env)
        for service in ("worker", "router") if name == "node" else (name,):
            wait_http(f"http://127.0.0.1:{ports[service]}/health", proc,
                      stack.run / "logs" / f"{name}.log", 60)
    router = f"http://127.0.0.1:{ports['router']}"
    alias = register_demo(router, engine, {"authorization": f"Bearer {tokens['ADMIN_TOKEN']}"})
    timeout = 900.0 if engine == "vllm" else 60.0
    if not wait_serving(router, alias, tokens["API_TOKEN"], timeout):
        print(f"  the demo model is not serving yet; see {router}/admin/status")
    print_examples(router, alias, tokens_file)
    signal.pause()


def main() -> None:
    ap = argparse.ArgumentParser(prog="scripts/start_all.sh", description=__doc__.split("\n")[0])
    ap.add_argument("--node", action="store_true",
                    help="run worker and router as one process (services.node): one hop fewer "
                         "per request, the router on one core")
    args = ap.parse_args()
    stack = Stack()

    def on_signal(signum: int, _: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_signal)
    # Launched from a script in the background (`setsid start_all.sh &`, nohup, a CI
    # runner), SIGINT arrives ignored and Python keeps it so: Ctrl-C (or a kill -INT) did
    # nothing. Restore the default handler explicitly.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        run(stack, args.node)
    except KeyboardInterrupt:
        print("\nstopping...")
    finally:
        stack.stop()


if __name__ == "__main__":
    main()
