"""The import direction the README's layout table promises, checked on every module of `gateway/`.

Each layer may import only the layers listed for it (and itself). Function-level imports count.
"""

from __future__ import annotations

import ast
from pathlib import Path

from testkit.gateways import ROOT

LAYERS: dict[str, tuple[str, ...]] = {
    "domain": ("gateway", "gateway.errors", "gateway.limits", "gateway.config", "gateway.tensors", "gateway.auth", "gateway.clock", "gateway.logs", "gateway.settings",
               "gateway.guardrails"),
    "state": ("gateway.state",),
    "signals": ("gateway.telemetry",),
    "models": ("gateway.registry", "gateway.runtime", "gateway.repository"),
    "data plane": ("gateway.inference", "gateway.admission", "gateway.routing", "gateway.shadow", "gateway.faults",
                   "gateway.feedback", "gateway.batcher", "gateway.runner", "gateway.checks"),
    "control": ("gateway.control", "gateway.edits", "gateway.desired", "gateway.follower",
                "gateway.replica"),
    "batch": ("gateway.batch",),
    "orchestration": ("gateway.orchestration",),
    "composition": ("gateway.app",),
    "transport": ("gateway.grpc", "gateway.pb"),
    "faces": ("gateway.cli",),
}  # fmt: skip

_BELOW_COMPOSITION = {"orchestration", "control", "batch", "data plane", "models", "signals", "state", "domain"}
MAY_IMPORT: dict[str, set[str]] = {
    "domain": set(),
    "state": {"domain"},
    "signals": {"domain"},
    "models": {"domain"},
    "data plane": {"models", "signals", "domain"},
    "control": {"data plane", "models", "state", "domain"},
    "batch": {"models", "state", "domain"},
    "orchestration": {"control", "data plane", "models", "signals", "state", "domain"},
    "composition": _BELOW_COMPOSITION,
    "transport": {"composition"} | _BELOW_COMPOSITION,
    "faces": set(LAYERS) - {"faces"},
}


def layer_of(module: str) -> str:
    best, length = "", -1
    for name, prefixes in LAYERS.items():
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > length:
                best, length = name, len(prefix)
    return best


def _imports(path: Path) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return {name for name in found if name == "gateway" or name.startswith("gateway.")}


def test_every_module_has_a_layer() -> None:
    unplaced = []
    for path in (ROOT / "gateway").rglob("*.py"):
        module = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
        if not layer_of(module) or (
            layer_of(module) == "domain"
            and module.count(".") == 1
            and module not in (prefix for prefixes in LAYERS.values() for prefix in prefixes)
        ):
            unplaced.append(module)
    assert not unplaced, f"modules with no layer in the table: {unplaced}"


def test_imports_point_down_the_layers() -> None:
    wrong = []
    for path in sorted((ROOT / "gateway").rglob("*.py")):
        if "pb" in path.relative_to(ROOT).parts:
            continue
        module = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
        source = layer_of(module)
        for imported in sorted(_imports(path)):
            target = layer_of(imported)
            if target != source and target not in MAY_IMPORT[source]:
                wrong.append(f"{module} ({source}) imports {imported} ({target})")
    assert not wrong, "imports against the layers:\n" + "\n".join(wrong)


def _top_level_imports(folder: str) -> set[tuple[str, str]]:
    found: set[tuple[str, str]] = set()
    for path in sorted((ROOT / folder).rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module]
            found.update((str(path.relative_to(ROOT)), name.split(".")[0]) for name in names)
    return found


def test_the_product_never_imports_test_code_and_benchmarks_never_import_tests() -> None:
    forbidden = {"gateway": {"tests", "benchmarks", "testkit"}, "testkit": {"tests", "benchmarks"},
                 "benchmarks": {"tests"}}  # fmt: skip
    wrong = [
        f"{path} imports {package}"
        for folder, packages in forbidden.items()
        for path, package in _top_level_imports(folder)
        if package in packages
    ]
    assert not wrong, "shared test code lives in testkit/:\n" + "\n".join(wrong)
