"""Benchmark suite: data plane (direct, worker proxy, router, nginx, vllm-router) and control
plane scale. Run ``.venv/bin/python -m bench.run``; see bench/README.md."""
