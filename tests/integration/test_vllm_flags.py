"""vLLM's own flags at registration and launch, with a stand-in vLLM package
(tests/integration/fake_vllm: vLLM 0.32's module layout for the parser, the simulated engine
behind its API server) on real worker, router and manager processes."""

from __future__ import annotations

import sys
from pathlib import Path

import httpx

from tests.support import ROOT, Cluster, Proc, model_status, register, running_on, wait_until

FAKE = Path(__file__).parent / "fake_vllm"


def _vllm_version(router: Proc) -> str | None:
    workers = httpx.get(f"{router.url}/admin/workers", timeout=10).json()["workers"]
    return next((w["vllm_version"] or None for w in workers), None)


def test_flags_read_from_vllm_refuse_unknown_ones_and_quiet_the_access_log(
    cluster: Cluster,
) -> None:
    cluster.manager()
    cluster.worker("w1", WORKER_ENGINES="vllm,sim", PYTHONPATH=f"{FAKE}:{ROOT}",
                   VLLM_COMMAND=f"{sys.executable} -m vllm.entrypoints.openai.api_server")
    router = cluster.router()
    version = wait_until(lambda: _vllm_version(router), 60, what="vLLM flags reported")
    assert version == "0.32.0+fake"

    refused = register(router, "old", engine="vllm", extra_args=["--disable-log-requests"])
    assert refused.status_code == 400
    error = refused.json()["error"]
    assert error["param"] == "extra_args"
    assert error["message"] == ("extra argument '--disable-log-requests' is not a flag of vLLM "
                                "0.32.0+fake (installed on worker w1); it would exit at start")
    ok = register(router, "new", engine="vllm", extra_args=["--enable-log-requests"])
    assert ok.status_code == 201, ok.text
    wait_until(lambda: running_on(router, "new") == ["w1"], 30,
               what=f"new running: {model_status(router, 'new')}")
    inst = model_status(router, "new")["instances"][0]  # type: ignore[index]
    # The engine is the sim behind the fake API server (exec: same pid); the worker's argv:
    log = (cluster.tmp / "state" / "w1" / "new.log").read_text()
    assert "--disable-access-log-for-endpoints" not in Path(
        f"/proc/{inst['pid']}/cmdline").read_text()  # the fake API server dropped it
    started = next(ln for ln in cluster.procs[1].tail(400).splitlines()
                   if "starting new (vllm)" in ln)
    assert "'--disable-access-log-for-endpoints', '/metrics,/health'" in started
    assert "--enable-log-requests" in started and "Traceback" not in log
    # Sim specs are not checked against vLLM's flags.
    assert register(router, "s", engine="sim", extra_args=["--ttft", "0"]).status_code == 201


def test_sandbox_at_registration_and_again_at_launch(cluster: Cluster, tmp_path: Path) -> None:
    cluster.manager()
    cluster.worker("w1")  # its own MODEL_ROOTS: none
    router = cluster.router(MODEL_ROOTS=str(tmp_path))
    refused = register(router, "root", model_name="/root")
    assert refused.status_code == 400
    assert refused.json()["error"]["param"] == "model_name"
    assert "MODEL_ROOTS" in refused.json()["error"]["message"]
    trust = register(router, "trust", extra_args=["--trust-remote-code"])
    assert trust.status_code == 400 and "ALLOW_TRUST_REMOTE_CODE" in trust.text
    models = httpx.get(f"{router.url}/admin/models", timeout=10).json()["models"]
    assert models == []  # nothing stored

    # The router allows this directory, the worker does not: it refuses to launch.
    assert register(router, "local", model_name=str(tmp_path / "m")).status_code == 201

    def failed() -> dict[str, str] | None:
        m = model_status(router, "local")
        inst = m["instances"][0] if m and m["instances"] else None
        return inst if inst and inst["state"] == "FAILED" else None

    inst = wait_until(failed, 20, what="launch refused")
    assert "MODEL_ROOTS" in inst["error"] and inst["pid"] == "0", inst
