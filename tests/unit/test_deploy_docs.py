"""docs/deploy.md names only deployment files that exist (or that the operator makes, from
instructions next to it), and the README links it."""

from __future__ import annotations

import re

from tests.unit.deploy_support import DEPLOY, K8S, ROOT

DOC = ROOT / "docs" / "deploy.md"
# Made by the operator (secrets) or as an example of their own overlay.
MADE_BY_OPERATOR = {"tokens.env", "redis.env", "overlays/mine/kustomization.yaml"}


def named_paths() -> set[str]:
    text = DOC.read_text()
    found = set(re.findall(r"\bdeploy/[A-Za-z0-9_./*-]*[A-Za-z0-9_]", text))
    found |= {f"deploy/kubernetes/{m}" for m in
              re.findall(r"(?<![/\w])((?:base|overlays)/[A-Za-z0-9_./-]*[A-Za-z0-9_])", text)}
    return found


def test_every_named_file_exists() -> None:
    paths = named_paths()
    assert len(paths) > 10
    for p in sorted(paths):
        if any(p.endswith(m) for m in MADE_BY_OPERATOR):
            continue
        if "*" in p:
            assert list(ROOT.glob(p)), p
            continue
        assert (ROOT / p).exists(), p


def test_every_overlay_and_unit_is_documented() -> None:
    text = DOC.read_text()
    for overlay in (K8S / "overlays").iterdir():
        assert f"overlays/{overlay.name}" in text, overlay.name
    for unit in (DEPLOY / "systemd").glob("*.service"):
        assert unit.stem in text, unit.name
    assert "not run on a real cluster" in text


def test_readme_links_the_deploy_doc() -> None:
    readme = (ROOT / "README.md").read_text()
    assert "## Deploy" in readme
    assert "(docs/deploy.md)" in readme
