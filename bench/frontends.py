"""The two front ends compared with the router: nginx in front of it, and vllm-router (Rust)
in front of the sim engines directly. Both pinned to the server core like the pool."""

from __future__ import annotations

from pathlib import Path

from bench.procset import SERVER_CORE, Children, free_port, need, pinned, wait_http, wait_tcp

# keepalive_requests: nginx's default (1000) would make wrk and the upstream pool reconnect
# every 1000 requests, a cost the other configurations do not pay.
_NGINX_CONF = """\
worker_processes 1;
pid {tmp}/nginx.pid;
error_log {tmp}/error.log warn;
events {{ worker_connections 8192; }}
http {{
    access_log off;
    client_body_temp_path {tmp}/body;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;
    keepalive_requests 1000000;
    upstream router {{
        server 127.0.0.1:{upstream};
        keepalive 512;
        keepalive_requests 1000000;
    }}
    server {{
        listen 127.0.0.1:{port};
        location / {{
            proxy_pass http://router;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering off;
            proxy_read_timeout 600s;
        }}
    }}
}}
"""


def start_nginx(children: Children, tmp: Path, router_url: str) -> tuple[str, int]:
    """nginx as a child (daemon off), its own prefix, pid and logs in ``tmp``."""
    binary = need("nginx", "apt-get install nginx-light")
    tmp.mkdir(parents=True, exist_ok=True)
    port = free_port()
    upstream = router_url.rsplit(":", 1)[1]
    conf = tmp / "nginx.conf"
    conf.write_text(_NGINX_CONF.format(tmp=tmp, upstream=upstream, port=port))
    argv = [binary, "-p", str(tmp), "-c", str(conf), "-g", "daemon off;"]
    proc = children.start("nginx", pinned(SERVER_CORE, argv))
    wait_tcp(port, proc, children.log("nginx"), 10)
    return f"http://127.0.0.1:{port}", proc.pid


def start_vllm_router(children: Children, name: str, engine_url: str) -> tuple[str, int]:
    """vllm-router with one worker, the sim engine; round robin (nothing to choose)."""
    binary = need("vllm-router", "python3 -m venv .venv-bench && "
                                 ".venv-bench/bin/pip install -r bench/requirements.txt")
    port = free_port()
    argv = [binary, "--host", "127.0.0.1", "--port", str(port), "--worker-urls", engine_url,
            "--policy", "round_robin", "--log-level", "warning",
            # Its metrics server defaults to a fixed port: two instances would collide.
            "--prometheus-port", str(free_port()), "--prometheus-host", "127.0.0.1"]
    proc = children.start(name, pinned(SERVER_CORE, argv))
    wait_http(f"http://127.0.0.1:{port}/health", proc, children.log(name), 60)
    return f"http://127.0.0.1:{port}", proc.pid
