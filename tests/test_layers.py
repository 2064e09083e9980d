"""The layers of docs/development.md, held by the imports: a lower layer never imports a
higher one, and the layers below the buildbot glue never import buildbot's worker or
process modules (they are buildbot's latent-worker machinery, which only the glue
speaks to). Read from the source with ``ast``: no module is imported to check it."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "buildbot_dockerami"

#: Package -> layer; a module may import its own package and lower layers only.
LAYERS = {
    "assets": 0,
    "protocol": 1,
    "cloud": 2,
    "fleet": 3,
    "config": 4,
    "patches": 5,
    "worker": 6,
    "steps": 6,
    "localcloud": 6,
    "www": 7,
    "cli": 8,
}
#: Third-party imports each low layer must not make (prefixes).
FORBIDDEN = {
    "protocol": ("buildbot", "boto3", "botocore", "twisted", "docker"),
    "cloud": ("buildbot",),
    "fleet": ("buildbot.worker", "buildbot.process"),
    "config": ("buildbot.worker", "buildbot.process"),
}


def layer_of(module: str) -> str | None:
    """``buildbot_dockerami.fleet.launch`` -> ``fleet``; the package's own top-level
    modules (its ``__init__``, the one-release ``multimaster`` alias) are no layer."""
    parts = module.split(".")
    if parts[0] != "buildbot_dockerami" or len(parts) < 2:
        return None
    return parts[1] if parts[1] in LAYERS else None


def imports(path: Path) -> list[tuple[int, str]]:
    """Every module ``path`` imports (``from X import y`` counts as X and X.y)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.lineno, node.module))
            found += [(node.lineno, f"{node.module}.{alias.name}") for alias in node.names]
    return found


def problems(root: Path = PACKAGE) -> list[str]:
    found = []
    for path in sorted(root.rglob("*.py")):
        module = ".".join(path.relative_to(root.parent).with_suffix("").parts)
        mine = layer_of(module)
        if mine is None:
            continue
        for line, imported in imports(path):
            theirs = layer_of(imported)
            where = f"{path.relative_to(root.parent)}:{line}"
            if theirs is not None and theirs != mine and LAYERS[theirs] >= LAYERS[mine]:
                found.append(f"{where}: {mine} (layer {LAYERS[mine]}) imports {imported} "
                             f"({theirs}, layer {LAYERS[theirs]})")
            if any(imported == p or imported.startswith(p + ".")
                   for p in FORBIDDEN.get(mine, ())):
                found.append(f"{where}: {mine} imports {imported}")
    return found


def test_every_package_has_a_layer() -> None:
    packages = {p.name for p in PACKAGE.iterdir()
                if p.is_dir() and (p / "__init__.py").exists()}
    assert packages <= set(LAYERS), packages - set(LAYERS)


def test_lower_layers_never_import_higher_ones_nor_buildbots_worker_machinery() -> None:
    assert problems() == []


@pytest.mark.parametrize(("module", "planted", "expected"), [
    ("fleet/planted.py", "from buildbot_dockerami.worker import latent\n",
     "fleet (layer 3) imports buildbot_dockerami.worker"),
    ("cloud/planted.py", "from buildbot_dockerami.fleet.service import Fleet\n",
     "cloud (layer 2) imports buildbot_dockerami.fleet.service"),
    ("fleet/planted.py", "from buildbot.worker.latent import States\n",
     "fleet imports buildbot.worker.latent"),
    ("protocol/planted.py", "import twisted.internet.defer\n",
     "protocol imports twisted.internet.defer"),
])
def test_a_planted_forbidden_import_is_found(tmp_path: Path, module: str, planted: str,
                                             expected: str) -> None:
    """The check can fail: a copy of the package with one forbidden import added."""
    for package in LAYERS:
        (tmp_path / "buildbot_dockerami" / package).mkdir(parents=True)
    target = tmp_path / "buildbot_dockerami" / module
    target.write_text(planted)
    assert any(expected in p for p in problems(tmp_path / "buildbot_dockerami")), \
        problems(tmp_path / "buildbot_dockerami")
