"""Loading the scripts under benchmarks/ (not a package) in tests."""
import importlib.util
import sys
from pathlib import Path

BENCHMARKS = Path(__file__).parent.parent / "benchmarks"


def load_benchmark(monkeypatch, name: str):
    """``benchmarks/<name>.py`` as a module. The sibling scripts it imports are found there
    during the test and forgotten after it, as the path is."""
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    before = set(sys.modules)
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    for sibling in set(sys.modules) - before:
        if Path(getattr(sys.modules[sibling], "__file__", None) or "/").parent == BENCHMARKS:
            monkeypatch.setitem(sys.modules, sibling, sys.modules.pop(sibling))  # removed again on undo
    return module
