"""The environment engines get: an allowlist, never the pool's secrets."""

from __future__ import annotations

from services.worker.engines.environment import engine_env, parse_passthrough

WORKER_ENV = {
    "PATH": "/usr/bin", "HOME": "/root", "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8",
    "CUDA_VISIBLE_DEVICES": "0", "NVIDIA_VISIBLE_DEVICES": "all", "VLLM_CPU_KVCACHE_SPACE": "1",
    "HF_TOKEN": "hf_x", "HF_HOME": "/hf", "TORCH_HOME": "/t", "OMP_NUM_THREADS": "2",
    "PYTHONPATH": "/src", "LD_LIBRARY_PATH": "/lib", "XDG_CACHE_HOME": "/c", "TMPDIR": "/tmp",
    "ADMIN_TOKEN": "a", "INTERNAL_TOKEN": "i", "API_TOKEN": "k", "REDIS_URL": "redis://:pw@h/0",
    "REDIS_SENTINELS": "h:1", "REDIS_PREFIX": "svllm", "AWS_SECRET_ACCESS_KEY": "s",
    "WORKER_ID": "w1", "MY_VAR": "m", "MYCO_A": "1", "MYCO_B": "2",
}


def test_allowlist_passes_what_engines_need_and_nothing_else() -> None:
    env = engine_env(WORKER_ENV, {})
    assert set(env) == {
        "PATH", "HOME", "LANG", "LC_ALL", "CUDA_VISIBLE_DEVICES", "NVIDIA_VISIBLE_DEVICES",
        "VLLM_CPU_KVCACHE_SPACE", "HF_TOKEN", "HF_HOME", "TORCH_HOME", "OMP_NUM_THREADS",
        "PYTHONPATH", "LD_LIBRARY_PATH", "XDG_CACHE_HOME", "TMPDIR"}


def test_passthrough_names_and_prefixes() -> None:
    extra = parse_passthrough(" MY_VAR, MYCO_*,,")
    assert extra == ("MY_VAR", "MYCO_*")
    env = engine_env(WORKER_ENV, {}, extra)
    assert {"MY_VAR", "MYCO_A", "MYCO_B"} <= set(env)


def test_pool_secrets_never_pass_not_even_named() -> None:
    extra = ("ADMIN_TOKEN", "INTERNAL_TOKEN", "API_TOKEN", "REDIS_*")
    env = engine_env(WORKER_ENV, {"REDIS_URL": "x", "CUDA_VISIBLE_DEVICES": "1"}, extra)
    assert not {"ADMIN_TOKEN", "INTERNAL_TOKEN", "API_TOKEN", "REDIS_URL",
                "REDIS_SENTINELS"} & set(env)
    assert env["REDIS_PREFIX"] == "svllm"  # named by the operator, not a secret
    assert env["CUDA_VISIBLE_DEVICES"] == "1"  # the launch's own value wins
