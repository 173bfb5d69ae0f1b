from __future__ import annotations

import pytest
from pydantic import ValidationError

from services.worker.engines.llamacpp import (
    LlamaCppDriver,
    build_llama_cpp_python_args,
    build_llama_server_args,
)
from services.worker.engines.sglang import SglangDriver, build_sglang_args
from services.worker.engines.sim import SimDriver
from services.worker.engines.vllm import VllmDriver, build_vllm_args, cuda_env
from services.worker.engines.vllm_flags import VllmInfo
from shared.engine_args import ExtraArgsError, normalize_extra_args
from shared.models import Assignment, ModelSpec, RegisterModelRequest
from shared.settings import WorkerSettings


def make(**kw) -> ModelSpec:
    return ModelSpec.model_validate({"alias": "m", "model_name": "org/m", "engine": "vllm"} | kw)


@pytest.mark.parametrize("alias", ["--foo", "../x", "a/b", "a:b", "", " a", "a b", "x" * 129, "-a"])
def test_hostile_aliases_rejected(alias: str) -> None:
    with pytest.raises(ValidationError):
        make(alias=alias)


@pytest.mark.parametrize("name", ["--foo", "../x", "a/../b", "-m", "a b", "a;rm", "$(x)", ""])
def test_hostile_model_names_rejected(name: str) -> None:
    with pytest.raises(ValidationError):
        make(model_name=name)


@pytest.mark.parametrize("name", ["Qwen/Qwen2.5-0.5B-Instruct", "/models/llama-3", "./tiny", "m"])
def test_good_model_names(name: str) -> None:
    assert make(model_name=name).model_name == name


def test_extra_args_allowlist() -> None:
    assert normalize_extra_args("vllm", ["--dtype=half", "--enforce-eager"]) == [
        "--dtype", "half", "--enforce-eager"]
    for bad in (["--port", "1"], ["--host", "0.0.0.0"], ["--served-model-name", "x"],
                ["--dtype", "--port"], ["--tokenizer", "../etc"], ["--max-num-seqs", "ten"],
                ["--enforce-eager=1"], ["--dtype"], ["--startup-delay", "1"]):
        with pytest.raises(ExtraArgsError):
            normalize_extra_args("vllm", bad)
    assert normalize_extra_args("sim", ["--startup-delay", "0.5"]) == ["--startup-delay", "0.5"]


def test_spec_bounds() -> None:
    for bad in ({"gpu_memory_utilization": 0}, {"gpu_memory_utilization": 1.5},
                {"tensor_parallel_size": 0}, {"max_model_len": 1}, {"engine": "nope"},
                {"unknown_field": 1}):
        with pytest.raises(ValidationError):
            make(**bad)


def test_register_request_uses_default_engine() -> None:
    req = RegisterModelRequest(alias="a", model_name="org/a")
    assert req.to_spec("sim").engine == "sim"
    explicit = RegisterModelRequest(alias="a", model_name="o/a", engine="vllm")
    assert explicit.to_spec("sim").engine == "vllm"
    with pytest.raises(ValueError, match="engine must be one of"):
        RegisterModelRequest(alias="a", model_name="o/a", engine="llama").to_spec("sim")


def test_vllm_argument_list() -> None:
    spec = make(gpu_memory_utilization=0.45, max_model_len=4096, tensor_parallel_size=2,
                extra_args=["--dtype", "half"])
    argv = build_vllm_args(["vllm", "serve"], spec, 41234)
    assert argv == ["vllm", "serve", "--model", "org/m", "--served-model-name", "m",
                    "--host", "127.0.0.1", "--port", "41234", "--tensor-parallel-size", "2",
                    "--gpu-memory-utilization", "0.45", "--max-model-len", "4096",
                    "--dtype", "half"]
    minimal = build_vllm_args(["python", "-m", "vllm.entrypoints.openai.api_server"], make(), 1)
    assert "--gpu-memory-utilization" not in minimal and "--max-model-len" not in minimal
    assert cuda_env([2, 3]) == {"CUDA_VISIBLE_DEVICES": "2,3"}
    assert cuda_env([]) == {}


def test_llamacpp_and_sglang_argument_lists() -> None:
    gguf = ModelSpec.model_validate({"alias": "g", "model_name": "/models/tiny.gguf",
                                     "engine": "llamacpp", "max_model_len": 2048,
                                     "extra_args": ["--threads", "4"]})
    assert build_llama_server_args("llama-server", gguf, 9000, [0]) == [
        "llama-server", "--model", "/models/tiny.gguf", "--alias", "g", "--host", "127.0.0.1",
        "--port", "9000", "--n-gpu-layers", "999", "--ctx-size", "2048", "--threads", "4"]
    py = build_llama_cpp_python_args(gguf, 9000, [])
    assert py[1:3] == ["-m", "llama_cpp.server"] and "--n_ctx" in py
    assert py[py.index("--n_gpu_layers") + 1] == "0"
    assert py[-2:] == ["--n_threads", "4"]  # llama-server's flag in the python server's words
    flags = gguf.model_copy(update={"extra_args": ["--flash-attn", "--n-gpu-layers", "10"]})
    py = build_llama_cpp_python_args(flags, 9000, [0])
    assert py.count("--n_gpu_layers") == 1 and py[py.index("--n_gpu_layers") + 1] == "10"
    assert py[-2:] == ["--flash_attn", "true"]
    with pytest.raises(ValueError, match="--parallel has no equivalent"):
        build_llama_cpp_python_args(gguf.model_copy(update={"extra_args": ["--parallel", "2"]}),
                                    9000, [])
    with pytest.raises(ValidationError, match=r"\.gguf"):
        ModelSpec.model_validate({"alias": "g", "model_name": "org/m", "engine": "llamacpp"})
    sg = ModelSpec.model_validate({"alias": "s", "model_name": "org/m", "engine": "sglang",
                                   "tensor_parallel_size": 2})
    argv = build_sglang_args(sg, 9001, 0.45)
    assert argv[1:3] == ["-m", "sglang.launch_server"]
    assert argv[argv.index("--mem-fraction-static") + 1] == "0.45"
    assert argv[argv.index("--tp") + 1] == "2"
    with pytest.raises(ValidationError, match="no sleep mode"):
        ModelSpec.model_validate({"alias": "s", "model_name": "org/m", "engine": "sglang",
                                  "idle_sleep_s": 10})


def test_an_engine_on_a_unix_socket_gets_uds_instead_of_host_and_port() -> None:
    argv = build_vllm_args(["vllm", "serve"], make(), 1, uds="/tmp/svllm-engines-x/1.sock")
    assert argv[argv.index("--uds") + 1] == "/tmp/svllm-engines-x/1.sock"
    assert "--host" not in argv and "--port" not in argv
    sim = SimDriver().launch(make(engine="sim"), 0, Assignment(alias="m", worker_id="w"),
                             "/tmp/s.sock").argv
    assert sim[sim.index("--uds") + 1] == "/tmp/s.sock" and "--port" not in sim


def test_vllm_serves_on_a_unix_socket_only_where_its_flags_say_so() -> None:
    driver = VllmDriver("vllm serve")
    assert not driver.unix_socket()  # flags not read (yet, or they could not be): a port
    driver.info = VllmInfo("0.32.0", frozenset({"--model", "--port", "--uds"}))
    assert driver.unix_socket()
    driver.info = VllmInfo("0.6.0", frozenset({"--model", "--port"}))
    assert not driver.unix_socket()
    for other in (SglangDriver(), LlamaCppDriver()):
        assert not other.unix_socket()
        with pytest.raises(RuntimeError, match="cannot serve on a Unix socket"):
            other.launch(make(), 0, Assignment(alias="m", worker_id="w"), "/tmp/s.sock")


def test_vllm_gets_the_reserved_share() -> None:
    argv = build_vllm_args(["vllm", "serve"], make(gpu_memory_mb=30_000), 1, gpu_util=0.375)
    assert argv[argv.index("--gpu-memory-utilization") + 1] == "0.375"


def test_worker_url_must_be_plain_http() -> None:
    assert WorkerSettings(worker_url="http://gpu-1:7000/").advertised_url() == "http://gpu-1:7000"
    for bad in ("https://gpu-1:7000", "http://gpu-1:7000/base", "gpu-1:7000"):
        with pytest.raises(ValidationError):
            WorkerSettings(worker_url=bad)
