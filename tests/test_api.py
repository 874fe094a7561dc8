import importlib

import pytest

import pyro_latdiff

MODULES = [
    "pyro_latdiff",
    "pyro_latdiff.testing",
    "pyro_latdiff.unbiased",
    "pyro_latdiff.unbiased.arrivals",
    "pyro_latdiff.unbiased.euler",
    "pyro_latdiff.unbiased.parametrix",
    "pyro_latdiff.unbiased.results",
    "pyro_latdiff.unbiased.rmlmc",
    "pyro_latdiff.inference_data",
    "pyro_latdiff.calibration",
    "pyro_latdiff.plots",
    "pyro_latdiff.checkpoint",
    "pyro_latdiff.sde",
    "pyro_latdiff.distribution",
    "pyro_latdiff.filter",
    "pyro_latdiff.chain",
    "pyro_latdiff.guide",
    "pyro_latdiff.infer",
    "pyro_latdiff.score",
    "pyro_latdiff.sampling",
    "pyro_latdiff.mcmc",
    "pyro_latdiff.parallel",
]


@pytest.mark.parametrize("module_name", MODULES)
def test_all_names_resolve_and_are_sorted(module_name):
    module = importlib.import_module(module_name)
    assert list(module.__all__) == sorted(module.__all__)
    for name in module.__all__:
        assert getattr(module, name) is not None


def test_contract_names_are_public():
    for name in [
        "LatentDiffusion",
        "NeuralDrift",
        "DiffusionGuide",
        "log_evidence",
        "fit",
        "to_inference_data",
    ]:
        assert name in pyro_latdiff.__all__
    from pyro_latdiff import to_inference_data  # noqa: F401  (loads ArviZ lazily)


# The package's layers, lowest first: a module imports only modules of lower layers (or
# of its own subpackage). DESIGN.md's Layers, with the two arrows the code needs: the
# reference problems of `testing` build `LatentDiffusion` models (so `testing` sits
# above `distribution`), and `plots` draws PSIS-weighted histograms from
# `inference_data` (so `plots` sits above it). A new module is one entry here.
LAYERS = [
    {"_shapes"},
    {"_warnings", "_validation", "checkpoint"},
    {"_traces"},
    {"sde", "unbiased"},
    {"distribution"},
    {"drift", "filter", "testing", "_model_checks", "_observations"},
    {"chain"},
    {"guide"},
    {"infer"},
    {"sampling", "score"},
    {"mcmc", "parallel", "lightning"},
    {"calibration"},
    {"inference_data"},
    {"plots"},
]


def _package_imports():
    """(importing component, imported component, where) for every import of one module
    of the package by another; a component is a top-level module or subpackage."""
    import ast
    from pathlib import Path

    root = Path(pyro_latdiff.__file__).parent
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root).with_suffix("").parts
        if parts == ("__init__",):
            continue  # the package's facade re-exports the public names
        package = parts[:-1]  # what a relative import of level 1 is relative to
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level:
                base = package[: len(package) - (node.level - 1)] if node.level > 1 else package
                target = list(base) + (node.module.split(".") if node.module else [])
                names = [target] if node.module else [target + [a.name] for a in node.names]
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith(
                "pyro_latdiff."
            ):
                names = [node.module.split(".")[1:]]
            elif isinstance(node, ast.Import):
                names = [
                    a.name.split(".")[1:] for a in node.names if a.name.startswith("pyro_latdiff.")
                ]
            else:
                continue
            for name in names:
                if name and name[0] != parts[0]:
                    yield parts[0], name[0], f"{path.name}:{node.lineno}"


def test_imports_point_down_the_layers():
    layer = {name: i for i, names in enumerate(LAYERS) for name in names}
    upward = []
    for importer, imported, where in _package_imports():
        assert importer in layer, f"module {importer} has no layer in LAYERS"
        assert imported in layer, f"module {imported} has no layer in LAYERS"
        if layer[imported] >= layer[importer]:
            upward.append(f"{where}: {importer} imports {imported}")
    assert not upward, upward


KNOWN_PRIVATE_IMPORTS: set[str] = set()


def test_no_module_imports_another_modules_private_names():
    import ast
    from pathlib import Path

    root = Path(pyro_latdiff.__file__).parent.parent
    files = [
        *sorted((root / "pyro_latdiff").rglob("*.py")),
        *sorted((root / "tests").glob("*.py")),
        *sorted((root / "examples").glob("*.py")),
        *sorted((root / "benchmarks").glob("*.py")),
    ]
    private = []
    for path in files:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (
                node.level or (node.module or "").startswith("pyro_latdiff")
            ):
                private += [
                    f"{path.relative_to(root)} {alias.name}"
                    for alias in node.names
                    if alias.name.startswith("_")
                ]
    assert not set(private) - KNOWN_PRIVATE_IMPORTS, private


def test_the_package_never_imports_the_peers():
    """numpyro, jax, pymc (benchmark peers) and lightning (the optional extra, loaded only
    by pyro_latdiff.lightning) stay out of every other module's imports."""
    import subprocess
    import sys

    code = (
        "import sys, importlib\n"
        f"for name in {MODULES!r}: importlib.import_module(name)\n"
        "print(sorted(m for m in ('lightning', 'numpyro', 'jax', 'pymc', 'pytensor') "
        "if m in sys.modules))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    assert out.strip() == "[]"
