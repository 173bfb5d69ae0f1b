"""``svllm`` commands: one function per command, all through :class:`Client`.

Configuration: ``SVLLM_URL`` (default http://127.0.0.1:8000) and ``SVLLM_ADMIN_TOKEN``, or
``--url`` / ``--token``. An error is one line on stderr with the API's message, exit code 1.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Annotated, Any

import orjson
import typer
import yaml
from rich.console import Console
from rich.live import Live

from services.cli import keys as keys_cli
from services.cli import render
from services.cli.client import Client, CliError
from services.cli.waiting import wait_serving
from shared import models_file
from shared.models import AdapterSpec, ModelSpec

app = typer.Typer(help="Operate a Serverless vLLM pool through its router's admin API.",
                  no_args_is_help=True, pretty_exceptions_enable=False)
models = typer.Typer(help="Register, inspect and control models.", no_args_is_help=True)
app.add_typer(models, name="models")
adapters = typer.Typer(help="LoRA adapters served as aliases of a base model.",
                       no_args_is_help=True)
app.add_typer(adapters, name="adapters")
app.add_typer(keys_cli.keys, name="keys")
app.add_typer(keys_cli.tenants, name="tenants")
app.command("usage")(keys_cli.usage)
out = Console()

JsonFlag = Annotated[bool, typer.Option("--json", help="Print the API's JSON.")]
WaitFlag = Annotated[bool, typer.Option("--wait", help="Show progress until the model serves.")]
Timeout = Annotated[float, typer.Option(help="Seconds --wait waits at most.")]


@app.callback()
def options(
    ctx: typer.Context,
    url: Annotated[str, typer.Option(envvar="SVLLM_URL", help="The router's URL.")] =
    "http://127.0.0.1:8000",
    token: Annotated[str | None, typer.Option(envvar="SVLLM_ADMIN_TOKEN",
                                              help="The admin token.")] = None,
) -> None:
    ctx.obj = Client(url, token)
    ctx.call_on_close(ctx.obj.close)


def client(ctx: typer.Context) -> Client:
    assert isinstance(ctx.obj, Client)
    return ctx.obj


def print_json(data: Any) -> None:
    sys.stdout.write(orjson.dumps(data, option=orjson.OPT_INDENT_2).decode() + "\n")


@app.command()
def status(ctx: typer.Context, as_json: JsonFlag = False) -> None:
    """Workers (GPU memory), models (state, replicas), instances and problems."""
    data = client(ctx).status()
    if as_json:
        print_json(data)
    else:
        out.print(render.status_view(data))


@app.command()
def top(ctx: typer.Context,
        interval: Annotated[float, typer.Option(help="Seconds between refreshes.")] = 2.0,
        iterations: Annotated[int, typer.Option(help="Stop after this many (0: never).")] = 0,
        ) -> None:
    """`status`, refreshed live until Ctrl-C."""
    c, n = client(ctx), 0
    with Live(render.status_view(c.status()), console=out, screen=False) as live:
        while iterations == 0 or n < iterations - 1:
            time.sleep(interval)
            live.update(render.status_view(c.status()))
            n += 1


def _scalar(text: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


@models.command("register")
def register(
    ctx: typer.Context,
    alias: str,
    model_name: str,
    engine: Annotated[str | None, typer.Option(help="vllm, sim, llamacpp, sglang.")] = None,
    replicas: Annotated[int | None, typer.Option()] = None,
    min_replicas: Annotated[int | None, typer.Option()] = None,
    extra_arg: Annotated[list[str] | None, typer.Option(
        help="An engine argument (repeat; use --extra-arg=--flag).")] = None,
    set_: Annotated[list[str] | None, typer.Option(
        "--set", help="Any other register field, FIELD=VALUE (repeat).")] = None,
    wait: WaitFlag = False,
    timeout: Timeout = 600.0,
) -> None:
    """Register ALIAS serving MODEL_NAME (same fields as POST /admin/models/register)."""
    body: dict[str, Any] = {"alias": alias, "model_name": model_name}
    given = {"engine": engine, "replicas": replicas, "min_replicas": min_replicas,
             "extra_args": extra_arg}
    body |= {k: v for k, v in given.items() if v is not None}
    for item in set_ or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise CliError(f"--set takes FIELD=VALUE, got '{item}'")
        body[key.strip()] = _scalar(value)
    c = client(ctx)
    res = c.post("/admin/models/register", body)
    out.print(f"{alias}: {'registered' if res['created'] else 'already registered, same spec'}")
    if wait:
        wait_serving(c, out, alias, timeout, wake_cold=False)


@models.command("rm")
def rm(ctx: typer.Context, alias: str) -> None:
    """Unregister ALIAS and stop its instances."""
    client(ctx).delete(f"/admin/models/{alias}")
    out.print(f"{alias}: deleted")


@models.command("wake")
def wake(ctx: typer.Context, alias: str, wait: WaitFlag = False, timeout: Timeout = 600.0,
         ) -> None:
    """Start or wake ALIAS now (and lift a manual stop)."""
    c = client(ctx)
    c.post(f"/admin/models/{alias}/wake")
    out.print(f"{alias}: waking")
    if wait:
        wait_serving(c, out, alias, timeout, wake_cold=True)


@models.command("sleep")
def sleep(ctx: typer.Context, alias: str) -> None:
    """Put ALIAS's engines to sleep (needs idle_sleep_s in its spec)."""
    client(ctx).post(f"/admin/models/{alias}/sleep")
    out.print(f"{alias}: going to sleep")


@models.command("stop")
def stop(ctx: typer.Context, alias: str) -> None:
    """Stop every instance of ALIAS and keep it stopped until a wake."""
    client(ctx).post(f"/admin/models/{alias}/stop")
    out.print(f"{alias}: stopping")


@models.command("show")
def show(ctx: typer.Context, alias: str, as_json: JsonFlag = False) -> None:
    """ALIAS's spec, state, timings and instances."""
    m = client(ctx).model(alias)
    if as_json:
        print_json(m)
    else:
        out.print(render.model_view(m))


@models.command("ls")
def ls(ctx: typer.Context, as_json: JsonFlag = False) -> None:
    """Registered models with state and replicas."""
    data = client(ctx).get("/admin/models")["models"]
    if as_json:
        print_json(data)
    else:
        out.print(render.models_table(data))


@app.command()
def logs(
    ctx: typer.Context,
    alias: str,
    worker: Annotated[str | None, typer.Option(help="Whose instance (default: a running one).")]
    = None,
    lines: Annotated[int, typer.Option("--lines", "-n")] = 100,
    follow: Annotated[bool, typer.Option("--follow", "-f", help="Keep printing new lines.")]
    = False,
    interval: Annotated[float, typer.Option(help="Seconds between reads with -f.")] = 0.5,
) -> None:
    """The engine log of ALIAS, read through its worker."""
    c = client(ctx)
    path = f"/admin/models/{alias}/log"
    res = c.get(path, worker=worker, lines=lines)
    sys.stdout.write(res["text"])
    sys.stdout.flush()
    while follow:
        time.sleep(interval)
        res = c.get(path, worker=res["worker_id"], since=res["offset"], lines=lines)
        sys.stdout.write(res["text"])
        sys.stdout.flush()


@app.command("apply")
def apply_file(
    ctx: typer.Context,
    file: Annotated[Path, typer.Option("--file", "-f", help="The models file (YAML).")],
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Show the diff, change nothing.")]
    = False,
    prune: Annotated[bool, typer.Option("--prune", help="Delete models not in the file.")]
    = False,
    as_json: JsonFlag = False,
) -> None:
    """Make the pool's models match FILE; shows the diff (added, changed fields, removed)."""
    try:
        doc = models_file.read_document(file)
    except models_file.SpecError as e:
        raise CliError(e.message) from None
    body: dict[str, Any] = {"models": doc.models, "prune": prune, "dry_run": dry_run}
    if doc.adapters is not None:
        body["adapters"] = doc.adapters
    diff = client(ctx).post("/admin/models/apply", body)
    if as_json:
        print_json(diff)
        return
    for line in render.diff_lines(diff, prune):
        out.print(line)
    verb = "would change" if dry_run else "changed"
    out.print(f"{verb} {render.changes(diff, prune)} model(s); "
              f"{len(diff['unchanged'])} unchanged")
    adapters = diff.get("adapters")
    if adapters is not None:
        out.print(f"{verb} {render.changes(adapters, prune)} adapter(s); "
                  f"{len(adapters['unchanged'])} unchanged")


@app.command()
def export(ctx: typer.Context) -> None:
    """The pool's models and LoRA adapters as a models file (YAML on stdout)."""
    c = client(ctx)
    specs = [ModelSpec.model_validate(m["spec"]) for m in c.get("/admin/models")["models"]]
    adapters = [AdapterSpec.model_validate({k: a[k] for k in ("alias", "base", "adapter")})
                for a in c.get("/admin/adapters")["adapters"]]
    sys.stdout.write(models_file.export_yaml(specs, adapters))


@app.command()
def prefetch(
    ctx: typer.Context, alias: str,
    worker: Annotated[list[str] | None, typer.Option(
        "--worker", "-w", help="A worker to download to (repeat); default: every live "
        "worker that lacks the weights.")] = None,
    as_json: JsonFlag = False,
) -> None:
    """Download ALIAS's weights to workers ahead of time; progress shows in `svllm status`."""
    res = client(ctx).post(f"/admin/models/{alias}/prefetch",
                           {"workers": worker} if worker else None)
    if as_json:
        print_json(res)
    elif res["workers"]:
        out.print(f"{alias}: prefetching {res['model_name']} to {', '.join(res['workers'])}")
    else:
        out.print(f"{alias}: every live worker already has {res['model_name']}")


@adapters.command("add")
def adapter_add(ctx: typer.Context, alias: str, base: str, adapter: str) -> None:
    """Serve LoRA ADAPTER (hub id or local dir) as ALIAS on BASE's replicas."""
    res = client(ctx).post("/admin/adapters", {"alias": alias, "base": base,
                                                "adapter": adapter})
    out.print(f"{alias}: {'registered' if res['created'] else 'already registered, same'}")


@adapters.command("ls")
def adapter_ls(ctx: typer.Context, as_json: JsonFlag = False) -> None:
    """Registered adapters, where they are loaded, loads and evictions."""
    data = client(ctx).get("/admin/adapters")["adapters"]
    if as_json:
        print_json(data)
        return
    for a in data:
        s = a["stats"]
        out.print(f"{a['alias']}  base={a['base']}  adapter={a['adapter']}  loaded_on="
                  f"{','.join(a['loaded_on']) or '-'}  loads={s['loads']}  "
                  f"evictions={s['evictions']}", markup=False, highlight=False)


@adapters.command("rm")
def adapter_rm(ctx: typer.Context, alias: str) -> None:
    """Unregister adapter ALIAS (engines unload it when they need the slot)."""
    client(ctx).delete(f"/admin/adapters/{alias}")
    out.print(f"{alias}: deleted")


def run() -> None:
    """The console script: an API error is one readable line and exit code 1 (usage errors
    keep typer's own message and exit code 2)."""
    try:
        app()
    except CliError as e:
        Console(stderr=True).print(f"svllm: error: {e}", markup=False, highlight=False,
                                   soft_wrap=True)
        sys.exit(1)
