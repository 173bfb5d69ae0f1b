"""What `svllm status` lists as problems, from /admin/status as the router answers it."""

from __future__ import annotations

from rich.console import Console, Group
from rich.text import Text

from services.cli.render import bar, gpus, instances_table, problems
from services.router.admin_api import reserved_by_gpu
from shared.models import Reservation


def test_problems_name_ejected_replicas_and_bad_records() -> None:
    status = {
        "workers": [{"worker_id": "w1", "alive": True}, {"worker_id": "w2", "alive": False}],
        "models": [{"alias": "m", "placement": "w1: not alive", "instances": [
            {"worker_id": "w1", "state": "FAILED", "error": "engine exited with code 1"}]}],
        "router": {"ejected": [{"model": "m", "worker": "w1", "seconds_left": 7.4}]},
        "problems": [{"key": "svllm:model:x", "field": "spec", "reason": "not JSON"},
                     {"key": "svllm:version:routes", "field": None, "reason": "not an integer"}],
    }
    assert problems(status) == [
        "worker w2 is not alive",
        "m: w1: not alive",
        "m on w1: engine exited with code 1",
        "router ejected m on w1 (7 s left)",
        "bad Redis record svllm:model:x [spec]: not JSON",
        "bad Redis record svllm:version:routes: not an integer",
    ]


def test_reserved_memory_per_gpu_from_the_ledger_and_its_bar() -> None:
    ledgers = {"w1": {"a": Reservation(alias="a", gpus=[0, 1], mb_per_gpu=1000),
                      "b": Reservation(alias="b", gpus=[1], mb_per_gpu=500)}, "w2": {}}
    assert reserved_by_gpu(ledgers) == {"w1": {"0": 1000, "1": 1500}, "w2": {}}
    # 2 of 10 cells used, 3 more reserved beyond what is used, 5 free.
    assert bar(200, 1000, 10, reserved=500).plain == "[██▒▒▒░░░░░]"
    worker = {"gpus": [{"index": 1, "memory_used_mb": 100, "memory_total_mb": 4000,
                        "memory_free_mb": 3900}], "gpu_reserved_mb": {"1": 1500}}
    view = gpus(worker)
    assert isinstance(view, Group) and isinstance(view.renderables[0], Text)
    assert view.renderables[0].plain.endswith("100/4000 MB used, 1500 reserved, 3900 free")


def test_instances_say_where_their_engine_serves() -> None:
    models = [{"alias": "m", "instances": [
        {"worker_id": "w1", "state": "RUNNING", "port": "0", "socket": "/tmp/svllm-e/1.sock"},
        {"worker_id": "w2", "state": "RUNNING", "port": "41234", "socket": ""}]}]
    console = Console(width=200, record=True)
    console.print(instances_table(models))
    text = console.export_text()
    assert "unix socket" in text and "port 41234" in text and "port 0" not in text
