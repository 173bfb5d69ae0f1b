"""stub"""
from typing import Any
def run(quick: bool) -> dict[str, Any]:
    return {}
def markdown(r: dict[str, Any]) -> str:
    return ""
