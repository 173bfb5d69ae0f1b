"""What `svllm status` lists as problems, from /admin/status as the router answers it."""

from __future__ import annotations

from services.cli.render import problems


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
