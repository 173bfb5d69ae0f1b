"""Router and worker in one process, for a pool whose router runs on the worker's machine.

The router's requests for this worker's replicas are then a call into the worker's proxy
(services.worker.proxy.InProcess), not an HTTP request to it: one loopback hop, one request
parse and one relay fewer per request, on a core that router, worker and engine share.
Both keep their own port, settings and API (other routers still reach this worker over HTTP,
and this router reaches other workers so), and the manager runs apart as always. What is
given up: the two fail and restart together, and the router runs as one process
(ROUTER_PROCESSES other than 1 is refused).
"""

from __future__ import annotations

from services.router import main as router_main
from services.worker import main as worker_main
from shared.exposure import enforce
from shared.logs import setup_logging
from shared.service import pin_mmap_threshold, run_together
from shared.settings import RouterSettings, WorkerSettings


def main() -> None:
    worker = WorkerSettings()
    router = RouterSettings()
    if "router_processes" in router.model_fields_set and router.router_processes != 1:
        raise SystemExit("services.node runs one router process beside its worker: unset "
                         "ROUTER_PROCESSES or set it to 1 (run routers of several processes "
                         "apart, with services.router.main)")
    router.router_processes = 1
    setup_logging(f"node {worker.worker_id}", router.log_level, router.log_format)
    pin_mmap_threshold()  # large relayed reads go back to the system once sent
    enforce(worker_main.worker_exposure(worker))
    enforce(router_main.router_exposure(router))
    # The router's requests wait on the engine as long as they would on a worker (its
    # UPSTREAM_*_TIMEOUT_S), not as long as the worker's proxy waits (an hour).
    worker_app = worker_main.create_app(worker, (router.upstream_connect_timeout_s,
                                                 router.upstream_read_timeout_s))
    router_app = router_main.create_app(router, in_process=worker_app.state.in_process)
    run_together([
        (worker_app, worker, worker.worker_host, worker.worker_port, worker_app.state.fast_lane),
        (router_app, router, router.router_host, router.router_port, router_app.state.fast_lane),
    ])


if __name__ == "__main__":
    main()
