"""The operator's sandbox for engines, and vLLM's own flags, at registration."""

from __future__ import annotations

from pathlib import Path

import pytest

from services.worker.engines.vllm import VllmDriver
from services.worker.engines.vllm_flags import (
    ProbeError,
    VllmInfo,
    parse_probe_output,
    python_of,
)
from shared.engine_args import ExtraArgsError, normalize_extra_args
from shared.engine_policy import (
    EngineFlags,
    PolicyError,
    Sandbox,
    check_known_flags,
    is_local_path,
)
from shared.models import Assignment, ModelSpec, RegisterModelRequest

STRICT = Sandbox()
ROOTS = Sandbox.from_settings(False, "/models, /srv/weights/")


def spec(model_name: str = "org/m", engine: str = "vllm", *args: str,
         box: Sandbox = STRICT) -> None:
    RegisterModelRequest(alias="a", model_name=model_name, engine=engine,
                         extra_args=list(args)).to_spec("vllm", box)


@pytest.mark.parametrize("name", ["/root", "/models/../etc", "./tiny", "a/b/c", "/modelsX/m"])
def test_local_model_outside_roots_is_refused_naming_the_setting(name: str) -> None:
    with pytest.raises(ValueError, match=r"MODEL_ROOTS|'\.\.' segment"):
        spec(name, box=ROOTS)


def test_model_root_paths_and_hub_ids() -> None:
    spec("/models/llama-3", box=ROOTS)
    spec("/srv/weights/q/v1", box=ROOTS)
    spec("Qwen/Qwen2.5-0.5B-Instruct")
    spec("gpt2")
    with pytest.raises(PolicyError, match=r"model_name '/models/llama-3' .*MODEL_ROOTS \(unset\)"):
        spec("/models/llama-3")


def test_llamacpp_model_is_always_a_local_file() -> None:
    with pytest.raises(PolicyError, match="MODEL_ROOTS"):
        spec("m.gguf", "llamacpp")
    spec("/models/m.gguf", "llamacpp", box=ROOTS)


def test_trust_remote_code_needs_its_setting() -> None:
    for engine in ("vllm", "sim", "sglang"):
        with pytest.raises(PolicyError, match="ALLOW_TRUST_REMOTE_CODE=true"):
            spec("org/m", engine, "--trust-remote-code")
        spec("org/m", engine, "--trust-remote-code", box=Sandbox(allow_trust_remote_code=True))


def test_unpickling_load_format_needs_trust() -> None:
    with pytest.raises(PolicyError, match="--load-format pt"):
        spec("org/m", "vllm", "--load-format", "pt")
    spec("org/m", "vllm", "--load-format", "safetensors")
    spec("org/m", "vllm", "--load-format", "pt", box=Sandbox(allow_trust_remote_code=True))


@pytest.mark.parametrize("args", [
    ["--chat-template", "/etc/passwd"], ["--download-dir", "/tmp/x"],
    ["--download-dir", "models"], ["--tokenizer", "/root/tok"],
    ["--lora-modules", "sql=/home/u/lora"], ["--generation-config", "/etc/gen"],
])
def test_file_arguments_outside_roots(args: list[str]) -> None:
    with pytest.raises(PolicyError, match=f"{args[0]} .*MODEL_ROOTS"):
        spec("org/m", "vllm", *args, box=ROOTS)


def test_file_arguments_under_roots_and_hub_ids() -> None:
    spec("org/m", "vllm", "--chat-template", "/models/t.jinja", "--download-dir", "/models/dl",
         "--tokenizer", "org/tok", "--lora-modules", "sql=org/sql-lora", box=ROOTS)


def test_reserved_flags_say_the_pool_sets_them() -> None:
    for flag in ("--port", "--host", "--api-key", "--model", "--served-model-name",
                 "--disable-access-log-for-endpoints", "--middleware", "--config"):
        with pytest.raises(ExtraArgsError, match="set by the pool itself"):
            normalize_extra_args("vllm", [flag, "x"])


def test_logging_flags_are_allowed() -> None:
    args = ["--enable-log-requests", "--disable-uvicorn-access-log", "--disable-log-stats",
            "--max-log-len", "100"]
    assert normalize_extra_args("vllm", args) == args


def test_value_with_trailing_newline_is_refused() -> None:
    with pytest.raises(ExtraArgsError):
        normalize_extra_args("vllm", ["--dtype", "half\n"])


def test_known_flags_name_the_flag_version_and_worker() -> None:
    v032 = EngineFlags("w1", "0.32.0", frozenset({"--enable-log-requests", "--dtype"}))
    old = EngineFlags("w2", "0.9.0", frozenset({"--disable-log-requests", "--dtype"}))
    check_known_flags(["--dtype", "half"], [v032, old])
    with pytest.raises(PolicyError, match=r"'--disable-log-requests' is not a flag of vLLM "
                                          r"0\.32\.0 \(installed on worker w1\)"):
        check_known_flags(["--disable-log-requests"], [v032, old])
    with pytest.raises(PolicyError, match=r"0\.9\.0"):
        check_known_flags(["--enable-log-requests"], [v032, old])
    check_known_flags(["--anything"], [])  # no worker reported: nothing to check against


def test_is_local_path() -> None:
    assert [is_local_path(v) for v in ("org/m", "m", "/m", "./m", "a/b/c", "~/m")] == [
        False, False, True, True, True, True]


def test_model_roots_must_be_absolute() -> None:
    with pytest.raises(ValueError, match="absolute"):
        Sandbox.from_settings(False, "models")


def test_probe_output_parsing(tmp_path: Path) -> None:
    out = 'INFO noise\nSVLLM-VLLM-FLAGS {"version": "0.32.0", "flags": ["--a", "-b"]}\n'
    info = parse_probe_output(out, 0, tmp_path / "log")
    assert info.version == "0.32.0" and info.flags == {"--a", "-b"}
    with pytest.raises(ProbeError, match="exit code 1"):
        parse_probe_output("Traceback ...\nImportError: no vllm\n", 1, tmp_path / "log")


def test_python_of_launch_prefix(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert python_of(["/venv/bin/python", "-m", "vllm.entrypoints.openai.api_server"]) == (
        "/venv/bin/python")
    script = tmp_path / "vllm"
    script.write_text("#!/opt/v/bin/python3 -s\nimport sys\n")
    script.chmod(0o755)
    monkeypatch.setenv("PATH", str(tmp_path))
    assert python_of(["vllm", "serve"]) == "/opt/v/bin/python3"


def test_vllm_launch_checks_flags_and_quiets_polling() -> None:
    driver = VllmDriver("/venv/bin/python -m vllm.entrypoints.openai.api_server")
    placed = Assignment(alias="a", worker_id="w1")
    good = ModelSpec(alias="a", model_name="org/m", engine="vllm", extra_args=["--dtype", "half"])
    assert "--disable-access-log-for-endpoints" not in driver.launch(good, 8000, placed).argv
    driver.info = VllmInfo("0.32.0", frozenset({"--dtype", "--disable-access-log-for-endpoints",
                                                "--disable-uvicorn-access-log"}))
    argv = driver.launch(good, 8000, placed).argv
    assert argv[-2:] == ["--disable-access-log-for-endpoints", "/metrics,/health"]
    driver.info = VllmInfo("0.9.0", frozenset({"--dtype", "--disable-uvicorn-access-log"}))
    assert driver.launch(good, 8000, placed).argv[-1] == "--disable-uvicorn-access-log"
    old = good.model_copy(update={"extra_args": ["--disable-log-requests"]})
    with pytest.raises(RuntimeError, match=r"'--disable-log-requests' is not a flag of vLLM 0\.9"):
        driver.launch(old, 8000, placed)
