"""The package's layers: errors (and versions) < models < testing < api < tutorial < cli, read from the source with ``ast``.

A module may import from its own layer or from layers below, never from one above (imports inside
functions count too), and the modules of the package must not import each other in a circle.
"""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "phi_helpers"
LAYERS = ("errors", "models", "testing", "api", "tutorial", "cli")
BOTTOM = {"versions": "errors"}  # plain constants that sit in the bottom layer beside errors.py
TOP = len(LAYERS)  # phi_helpers/__init__.py and __main__.py: the package's front door, above every layer


def module_name(path: Path) -> str:
    parts = ("phi_helpers", *path.relative_to(PACKAGE).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def layer(module: str) -> int:
    """0 for errors ... 5 for cli; TOP for the package itself (its __init__ and __main__)."""
    parts = module.split(".")
    if len(parts) == 1 or parts[1] == "__main__":
        return TOP
    return LAYERS.index(BOTTOM.get(parts[1], parts[1]))


def resolve(module: str, node: ast.ImportFrom | ast.Import) -> list[str]:
    """The phi_helpers modules that an import statement anywhere in ``module`` loads by name."""
    if isinstance(node, ast.Import):
        names = [alias.name for alias in node.names]
    else:
        if node.level:
            package = module if MODULES[module].name == "__init__.py" else module.rpartition(".")[0]
            for _ in range(node.level - 1):
                package = package.rpartition(".")[0]
            base = f"{package}.{node.module}" if node.module else package
        else:
            base = node.module
        # `from package import submodule` loads the submodule; `from module import name` loads module
        names = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base for alias in node.names]
    return [name for name in names if name == "phi_helpers" or name.startswith("phi_helpers.")]


def imports_of(module: str) -> set[str]:
    tree = ast.parse(MODULES[module].read_text(encoding="utf-8"))
    found = set()
    for node in ast.walk(tree):  # every import, also those inside functions and classes
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            found.update(resolve(module, node))
    return found - {module}


GRAPH = {module: imports_of(module) for module in MODULES}


def test_every_module_is_in_a_layer():
    assert len(MODULES) > 30
    for module in MODULES:
        layer(module)  # raises ValueError for a folder that is not a layer


@pytest.mark.parametrize("module", sorted(MODULES))
def test_no_import_from_a_higher_layer(module):
    upward = sorted(target for target in GRAPH[module] if layer(target) > layer(module))
    assert not upward, f"{module} (layer {LAYERS[layer(module)] if layer(module) < TOP else 'top'}) imports {upward}"


def test_no_import_cycles():
    done, active = set(), []

    def visit(module):
        if module in active:
            cycle = active[active.index(module):] + [module]
            pytest.fail("import cycle: " + " -> ".join(cycle))
        if module in done:
            return
        active.append(module)
        for target in sorted(GRAPH[module]):
            if target in MODULES:
                visit(target)
        active.pop()
        done.add(module)

    for module in sorted(MODULES):
        visit(module)


def test_no_module_imports_another_modules_private_names():
    """A name with a leading underscore is its module's own business: a module that needs another's
    helper gets it under a public name (the helper is then part of what that module offers)."""
    private = sorted(f"{module} imports {alias.name} from {node.module or '.'}"
                     for module, path in MODULES.items()
                     for node in ast.walk(ast.parse(path.read_text(encoding="utf-8")))
                     if isinstance(node, ast.ImportFrom) and node.module != "__future__"
                     for alias in node.names if alias.name.startswith("_") and not alias.name.startswith("__"))
    assert not private, private


def test_the_checker_sees_imports_inside_functions_and_relative_levels():
    """The checker itself: an upward import hidden in a function is found and resolved."""
    source = "def f():\n    from ..cli.app import main\n    from .. import testing\n"
    found = {target for node in ast.walk(ast.parse(source)) if isinstance(node, ast.ImportFrom)
             for target in resolve("phi_helpers.api.loading", node)}
    assert found == {"phi_helpers.cli.app", "phi_helpers.testing"}


def test_predict_goes_down_to_the_model():
    """phi-helpers predict: cli.app -> cli.tasks -> api.generation -> the model, never back up."""
    assert "phi_helpers.cli.tasks" in GRAPH["phi_helpers.cli.app"]
    assert "phi_helpers.api.generation" in GRAPH["phi_helpers.cli.tasks"]
    assert "phi_helpers.models.phi3_v.processing_phi3_v" in GRAPH["phi_helpers.api.generation"]
    for module in ("phi_helpers.api.generation", "phi_helpers.api.prompts", "phi_helpers.models.phi3_v.modeling_phi3_v"):
        assert not any(target.startswith(("phi_helpers.cli", "phi_helpers.tutorial")) for target in GRAPH[module])


def test_the_public_api_fits_one_screen_and_every_name_it_lists_exists():
    import pydoc
    import re

    import phi_helpers

    screen = pydoc.render_doc(phi_helpers, renderer=pydoc.plaintext)
    assert len(screen.splitlines()) <= 60 and "SUBMODULES" not in screen  # no alias module under the package
    listed = re.findall(r"^    (\w+)(?=[( ])", phi_helpers.__doc__.split("The whole public API:")[1], re.MULTILINE)
    assert {"load_model", "ask", "extract", "Chat", "PhiHelpersError"} <= set(listed)
    for name in [*listed, "PromptError", "SchemaError", "InvalidArgumentError", "ImageLoadError"]:
        assert hasattr(phi_helpers, name), name
    exported_errors = {name for name in dir(phi_helpers) if name.endswith(("Error", "Timeout"))}
    unnamed = {name for name in exported_errors if not re.search(rf"\b{name}\b", phi_helpers.__doc__)}
    assert not unnamed, f"errors importable from phi_helpers that help(phi_helpers) does not name: {unnamed}"


def test_import_star_gives_the_public_names_and_no_leftovers():
    """The docstring's names, the errors load_model raises and load_schema (which an error message and
    notebook 06 name); not the logging module or the loop variable that quiets two loggers on import."""
    import phi_helpers

    namespace = {}
    exec("from phi_helpers import *", namespace)
    assert "logging" not in namespace and not hasattr(phi_helpers, "_logger")
    for name in ("load_schema", "ModelLoadError", "ConfigurationError", "QuantizationUnavailableError",
                 "QuantizationBackendMissingError", "DeviceUnavailableError", "FlashAttentionUnavailableError"):
        assert name in namespace, name
    from phi_helpers.api.structured import load_schema

    assert phi_helpers.load_schema is load_schema


def test_importing_the_package_leaves_jsonschema_for_the_first_schema():
    """``import jsonschema`` builds its format checkers' grammars (rfc3987_syntax): over a second of CPU on every
    ``import phi_helpers`` and every ``phi-helpers --help``, for a library only a schema needs."""
    code = ("import sys, phi_helpers, phi_helpers.cli.app; assert 'jsonschema' not in sys.modules; "
            "phi_helpers.api.structured.check_schema({'type': 'object'}); assert 'jsonschema' in sys.modules")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
