"""Checks of the GPU twin that need no GPU: its shape mirrors the reference, and its CUDA compiles.

1. ``gpu/ops`` mirrors ``reference/ops`` module for module: the same public
   ``*_forward``/``*_backward`` functions with the same parameters (read from
   the source, so CuPy need not be installed), and no ``gpu/ops`` module
   imports ``reference.ops``.
2. Every kernel declared in :mod:`gpu.kernels` compiles for float and double,
   with NVRTC (CuPy's compiler) or ``nvcc``, whichever this machine has. No
   GPU is needed, nor CuPy: without it the op modules are imported against a
   placeholder just long enough to collect their kernel sources.
"""

from __future__ import annotations

import ast
import importlib
import os
import shutil
import subprocess
import sys
import tempfile
import types
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# reference/ops modules that hold no op: how the CPU kernels share out a batch over threads (a GPU has no use for it)
HELPERS = {"__init__", "parallel"}
FAMILIES = sorted(p.stem for p in (ROOT / "reference" / "ops").glob("*.py") if p.stem not in HELPERS)


def _public_ops(path: Path) -> dict[str, list[str]]:
    """``{function name: parameter names}`` of the ``*_forward``/``*_backward`` functions in ``__all__``."""
    tree = ast.parse(path.read_text())
    exported: set[str] = set()
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "__all__" for t in node.targets):
            exported = {elt.value for elt in node.value.elts}
    found = {}
    for node in tree.body:
        if (
            isinstance(node, ast.FunctionDef)
            and node.name in exported
            and node.name.endswith(("_forward", "_backward"))
        ):
            args = node.args
            found[node.name] = [a.arg for a in args.posonlyargs + args.args + args.kwonlyargs]
    return found


NEEDS = "needs_input_grad"  # the forwards' last parameter in a kernel set that declares NEEDS_INPUT_GRAD


def _declares_needs_input_grad(package: Path) -> bool:
    """Whether ``package/__init__.py`` sets ``NEEDS_INPUT_GRAD = True`` (read from the source)."""
    for node in ast.parse((package / "__init__.py").read_text()).body:
        if isinstance(node, ast.Assign) and any(
            getattr(t, "id", None) == "NEEDS_INPUT_GRAD" for t in node.targets
        ):
            return getattr(node.value, "value", None) is True
    return False


@pytest.mark.parametrize("family", FAMILIES)
def test_gpu_ops_mirror_reference_ops(family):
    gpu_path = ROOT / "gpu" / "ops" / f"{family}.py"
    assert gpu_path.exists(), f"gpu/ops/{family}.py is missing: every reference.ops module has a GPU twin"
    reference_ops, gpu_ops = _public_ops(ROOT / "reference" / "ops" / f"{family}.py"), _public_ops(gpu_path)
    assert reference_ops, f"reference/ops/{family}.py exports no ops"
    assert sorted(gpu_ops) == sorted(reference_ops), f"gpu/ops/{family}.py exports different ops"
    for side, ops in (("reference", reference_ops), ("gpu", gpu_ops)):
        declares = _declares_needs_input_grad(ROOT / side / "ops")
        for name, params in ops.items():
            if name.endswith("_forward"):
                assert (params[-1:] == [NEEDS]) == declares, (
                    f"{side}.ops.{name}: NEEDS_INPUT_GRAD is {declares}, so its last parameter "
                    f"{'must' if declares else 'must not'} be {NEEDS}; got {params}"
                )
    for name, params in reference_ops.items():
        ours, theirs = [p for p in params if p != NEEDS], [p for p in gpu_ops[name] if p != NEEDS]
        assert theirs == ours, f"{family}.{name}: GPU parameters {gpu_ops[name]} != {params}"


@pytest.mark.parametrize("path", sorted((ROOT / "gpu" / "ops").glob("*.py")), ids=lambda p: p.name)
def test_gpu_ops_never_import_the_reference_kernels(path):
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            module = node.module or ""
            assert not module.startswith("reference.ops"), f"{path.name} imports {module}"
            assert not (
                node.level == 0 and module == "reference" and any(a.name == "ops" for a in node.names)
            )
        elif isinstance(node, ast.Import):
            assert not any(a.name.startswith("reference.ops") for a in node.names), f"{path.name} imports it"


@pytest.mark.parametrize("family", FAMILIES)
def test_gpu_ops_cite_the_reference_equations(family):
    source = (ROOT / "gpu" / "ops" / f"{family}.py").read_text()
    assert f"reference.ops.{family}" in source, f"gpu/ops/{family}.py should name the module it mirrors"
    assert "# (" in source, f"gpu/ops/{family}.py cites no equation numbers"


# ------------------------------------------------------------------------ compiling the kernels
def _compiler():
    """``(name, compile(source) -> error text or None)`` for NVRTC or nvcc; None when neither works."""
    try:
        from cupy.cuda import nvrtc

        def run_nvrtc(source: str) -> str | None:
            program = nvrtc.createProgram(source, "kernel.cu", [], [])
            try:
                nvrtc.compileProgram(program, ["-arch=compute_80", "-std=c++17"])
            except nvrtc.NVRTCError:
                return nvrtc.getProgramLog(program)
            finally:
                nvrtc.destroyProgram(program)
            return None

        if run_nvrtc('extern "C" __global__ void probe() {}') is None:
            return "nvrtc", run_nvrtc
    except Exception:  # no CuPy, or no NVRTC library: try nvcc
        pass
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return None

    def run_nvcc(source: str) -> str | None:
        with tempfile.TemporaryDirectory() as tmp:
            cu = os.path.join(tmp, "k.cu")
            Path(cu).write_text(source)
            done = subprocess.run(
                [nvcc, "-std=c++17", "-arch=sm_80", "-c", cu, "-o", os.path.join(tmp, "k.o")],
                capture_output=True,
                text=True,
            )
            return None if done.returncode == 0 else done.stderr

    return "nvcc", run_nvcc


class _Anything:
    """Stands in for every CuPy attribute an op module touches at import time (never called for real)."""

    def __getattr__(self, name):
        return _Anything()

    def __call__(self, *args, **kwargs):
        return _Anything()


def _declared_kernels() -> dict:
    """Import the twin's modules (declaring every kernel) and return the registry.

    Without CuPy, a placeholder ``cupy`` module is installed for the duration of
    the import: the op modules only declare kernels when imported, so their
    sources can be collected and compiled on any machine with a CUDA compiler.
    The placeholder and the modules imported through it are removed afterwards.
    """
    try:
        import cupy  # noqa: F401
    except ImportError:
        saved = {name: mod for name, mod in sys.modules.items() if name == "gpu" or name.startswith("gpu.")}
        placeholder = types.ModuleType("cupy")
        placeholder.__getattr__ = lambda name: _Anything()  # module-level __getattr__ (PEP 562)
        sys.modules["cupy"] = placeholder
        try:
            for name in list(saved):
                del sys.modules[name]
            importlib.import_module("gpu.ops")
            importlib.import_module("gpu.optim")
            return dict(importlib.import_module("gpu.kernels").REGISTRY)
        finally:
            for name in [n for n in sys.modules if n == "cupy" or n == "gpu" or n.startswith("gpu.")]:
                del sys.modules[name]
            sys.modules.update(saved)
    import gpu.ops  # noqa: F401  (importing the modules declares every kernel)
    import gpu.optim  # noqa: F401
    from gpu.kernels import REGISTRY

    return dict(REGISTRY)


def test_every_kernel_compiles():
    from gpu.kernels import check_source

    found = _compiler()
    if found is None:
        pytest.skip("neither NVRTC (through CuPy) nor nvcc is available to compile the kernels")
    _, compile_source = found
    registry = _declared_kernels()
    assert len(registry) >= 10, f"only {len(registry)} kernels are declared"
    jobs = [
        (name, t, check_source(spec, t))
        for name, spec in sorted(registry.items())
        for t in ("float", "double")
    ]
    with ThreadPoolExecutor(max_workers=4) as pool:
        errors = list(pool.map(lambda job: compile_source(job[2]), jobs))
    failures = [
        f"{name} ({t}):\n{err}\n--- source ---\n{src}" for (name, t, src), err in zip(jobs, errors) if err
    ]
    assert not failures, "\n\n".join(failures[:3])
