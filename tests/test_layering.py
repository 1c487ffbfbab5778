"""The import direction of DESIGN.md §2, checked by parsing every module's imports.

config ← nn ← models ← {generation, eval} ← tasks ← train ← cli; data imports only config;
models never imports data, tasks, train, accelerate or wandb. ``mm.errors`` sits beside config.
"""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "mm"

# For each layer: the mm layers it may import. Unlisted third-party libraries are free except
# where FORBIDDEN_EXTERNAL says otherwise.
ALLOWED = {
    "errors": set(),
    "config": {"errors"},
    "nn": set(),  # torch only
    "data": {"config", "errors"},
    "models": {"config", "errors", "nn"},
    "generation": {"config", "errors", "nn", "models", "data"},
    "eval": {"config", "errors", "nn", "models", "generation", "data"},
    "tasks": {"config", "errors", "nn", "models", "generation", "eval", "data"},
    "train": {"config", "errors", "nn", "models", "generation", "eval", "data", "tasks"},
    "cli": {"config", "errors", "nn", "models", "generation", "eval", "data", "tasks", "train"},
    "__main__": {"cli"},
    "__init__": set(),
}
FORBIDDEN_EXTERNAL = {
    "nn": {"accelerate", "wandb", "transformers", "diffusers", "webdataset", "numpy", "PIL"},
    "models": {"accelerate", "wandb", "webdataset"},
    "data": {"accelerate", "wandb", "diffusers"},
    "generation": {"accelerate", "wandb"},
    "eval": {"accelerate", "wandb"},
    "tasks": {"wandb"},
}


def layer_of(path: Path) -> str:
    rel = path.relative_to(ROOT)
    return rel.parts[0] if len(rel.parts) > 1 else rel.stem


def imports_of(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative import: resolve against the package
                pkg = path.relative_to(ROOT.parent).with_suffix("").parts[: -node.level]
                base = ".".join(pkg)
                names.append(f"{base}.{node.module}" if node.module else base)
            elif node.module:
                names.append(node.module)
    return names


FILES = sorted(ROOT.rglob("*.py"))


def test_there_are_modules():
    assert len(FILES) > 5


@pytest.mark.parametrize("path", FILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_import_direction(path):
    layer = layer_of(path)
    assert layer in ALLOWED, f"{path}: layer '{layer}' is not in DESIGN.md §2; add it to the layering test"
    for name in imports_of(path):
        parts = name.split(".")
        if parts[0] == "mm":
            if len(parts) == 1:
                target = "__init__"
            else:
                target = parts[1]
            if target == layer:
                continue
            assert target in ALLOWED[layer], f"{path.relative_to(ROOT)} ({layer}) imports {name}"
        else:
            assert parts[0] not in FORBIDDEN_EXTERNAL.get(layer, set()), (
                f"{path.relative_to(ROOT)} ({layer}) imports {name}")


def test_import_mm_is_light():
    import subprocess
    import sys

    code = ("import sys, mm, mm.config, mm.cli; "
            "heavy = [m for m in ('wandb','diffusers','transformers','accelerate','webdataset') if m in sys.modules]; "
            "print(','.join(heavy))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"import mm pulled in {out.stdout.strip()}"
