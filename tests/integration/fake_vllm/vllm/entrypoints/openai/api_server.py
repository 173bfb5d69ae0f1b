"""``python -m vllm.entrypoints.openai.api_server``: parse like the fake vLLM, serve with the
simulated engine (which knows fewer flags)."""

import os
import sys

if __name__ == "__main__":
    from vllm.entrypoints.launchers.cli_args import make_arg_parser
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    args = sys.argv[1:]
    make_arg_parser(FlexibleArgumentParser()).parse_args(args)  # exits 2 on an unknown flag
    sim_known = ("--model", "--served-model-name", "--host", "--port", "--uds", "--max-model-len",
                 "--dtype", "--max-num-seqs", "--seed", "--gpu-memory-utilization",
                 "--tensor-parallel-size", "--enable-sleep-mode", "--enable-prefix-caching")
    keep: list[str] = []
    i = 0
    while i < len(args):
        takes_value = i + 1 < len(args) and not args[i + 1].startswith("--")
        if args[i] in sim_known:
            keep += args[i:i + 2] if takes_value else args[i:i + 1]
        i += 2 if takes_value else 1
    os.execv(sys.executable, [sys.executable, "-m", "services.sim_engine", *keep])
