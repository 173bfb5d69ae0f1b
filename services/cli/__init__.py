"""``svllm``: the operators' command line, a client of the router's admin REST API."""
