from vllm.utils.argparse_utils import FlexibleArgumentParser

VALUE_FLAGS = ("--model", "--served-model-name", "--host", "--port", "--uds", "--api-key",
               "--tensor-parallel-size", "--gpu-memory-utilization", "--max-model-len",
               "--dtype", "--max-num-seqs", "--seed", "--disable-access-log-for-endpoints")
SWITCHES = ("--enforce-eager", "--enable-prefix-caching", "--enable-sleep-mode",
            "--enable-log-requests", "--disable-uvicorn-access-log", "--trust-remote-code")


def make_arg_parser(parser: FlexibleArgumentParser) -> FlexibleArgumentParser:
    for flag in VALUE_FLAGS:
        parser.add_argument(flag)
    parser.add_argument("-tp", dest="tp")
    for flag in SWITCHES:
        parser.add_argument(flag, action="store_true")
    return parser
