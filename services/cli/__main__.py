"""``python -m services.cli``: the same as the ``svllm`` console script."""

from services.cli.main import run

run()
