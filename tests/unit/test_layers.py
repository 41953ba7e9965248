"""The package layers (see docs/architecture.md): the core imports no transport, and no
transport (or the control plane) imports another; only the composition root (the
top-level modules: cli, config, ...) wires them together.

Read from the source with ast, so an import inside a function counts too.
"""

from __future__ import annotations

import ast
from pathlib import Path

BRIDGE = Path(__file__).resolve().parents[2] / "bridge"

# Each subpackage belongs to one layer; virtio and vfio_user together are the KVM
# transport (the virtio-scsi device model and the vfio-user server that exports it).
LAYER_OF = {
    "scsi": "core",
    "virtio": "kvm",
    "vfio_user": "kvm",
    "xen": "xen",
    "control": "control",
    # The service's host side (locks, sd_notify, log setup): used by the composition root.
    "daemon": "daemon",
}
# What each layer may import besides itself and neutral top-level modules.
ALLOWED = {
    "core": set(),
    "kvm": {"core"},
    "xen": {"core"},
    "control": {"core"},
    "daemon": set(),
}


def _modules() -> dict[str, Path]:
    out = {}
    for path in BRIDGE.rglob("*.py"):
        rel = path.relative_to(BRIDGE.parent).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def _imports(name: str, path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            found.add(mod)
            found.update(f"{mod}.{a.name}" for a in node.names)
    return {m for m in found if m == "bridge" or m.startswith("bridge.")}


def _layer(module: str) -> str | None:
    """The layer of a module, None for a top-level module (bridge/x.py) or its names."""
    parts = module.split(".")
    if len(parts) < 2 or not (BRIDGE / parts[1]).is_dir():
        return None
    return LAYER_OF.get(parts[1], "unknown")


def test_every_subpackage_has_a_layer():
    subpackages = {p.name for p in BRIDGE.iterdir() if (p / "__init__.py").exists()}
    assert subpackages <= set(LAYER_OF), subpackages - set(LAYER_OF)


def test_no_layer_imports_a_sibling_or_one_above():
    modules = _modules()
    bad = []
    for name, path in modules.items():
        layer = _layer(name)
        if layer is None:
            continue  # a top-level module: the composition root, or neutral
        for imported in _imports(name, path):
            other = _layer(imported)
            if other is None:
                top = ".".join(imported.split(".")[:2])
                # a neutral helper (bridge/ratelimit.py, ...) imports no layer itself
                if top in modules and any(_layer(m) for m in _imports(top, modules[top])):
                    bad.append(f"{name} -> {top} (a top-level module that wires layers)")
            elif other != layer and other not in ALLOWED[layer]:
                bad.append(f"{name} ({layer}) -> {imported} ({other})")
    assert not bad, "\n".join(sorted(set(bad)))


def test_the_checker_sees_a_violation(tmp_path, monkeypatch):
    """The walker itself: a core module importing a transport is reported."""
    core = tmp_path / "bridge" / "scsi"
    core.mkdir(parents=True)
    (tmp_path / "bridge" / "__init__.py").write_text("")
    (core / "__init__.py").write_text("")
    (core / "x.py").write_text("def f():\n    from bridge.xen import ring\n")
    assert "bridge.xen.ring" in _imports("bridge.scsi.x", core / "x.py")
    assert _layer("bridge.xen.ring") == "xen" and _layer("bridge.scsi.x") == "core"
