"""The project's layout: no top-level module shadows an installed package (scripts run from the project root, so
its folder comes first on sys.path: a `kernels.py` here once broke transformers, which imports the `kernels`
package)."""
import importlib.metadata
import os

from conftest import ROOT


def top_level_modules():
    names = [f[:-3] for f in os.listdir(ROOT) if f.endswith(".py")]
    names += [d for d in os.listdir(ROOT) if os.path.isfile(os.path.join(ROOT, d, "__init__.py"))]
    return sorted(names)


def test_no_module_shadows_an_installed_package():
    installed = importlib.metadata.packages_distributions()  # import name -> distributions providing it
    shadowed = {n: installed[n] for n in top_level_modules() if n in installed}
    assert not shadowed, f"project modules shadow installed packages (rename them): {shadowed}"
