"""The project's layout: no top-level module shadows an installed package (scripts run from the project root, so
its folder comes first on sys.path: a `kernels.py` here once broke transformers, which imports the `kernels`
package); imports point one way (an ast read of every module, lazy imports and command blocks included, fails on a
circle)."""
import ast
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


def module_imports(path, names):
    """The project modules a file imports: every import statement, at the top, inside functions (lazy ones) and in
    its `if __name__ == "__main__":` block. Nothing imports a command block, so it cannot close a circle at run time;
    it counts anyway, because a reader following the imports from the command down must never come back up."""
    tree = ast.parse(open(path).read())
    body = list(tree.body)
    found = set()
    for node in (n for top in body for n in ast.walk(top)):
        if isinstance(node, ast.Import):
            found |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
    return sorted(found & set(names) - {os.path.basename(path)[:-3]})


def import_graph():
    names = [f[:-3] for f in os.listdir(ROOT) if f.endswith(".py")]
    return {n: module_imports(os.path.join(ROOT, n + ".py"), names) for n in names}


def find_cycle(graph):
    state, stack = {}, []

    def visit(n):
        state[n] = "open"
        stack.append(n)
        for m in graph[n]:
            if state.get(m) == "open":
                return stack[stack.index(m):] + [m]
            if m not in state and (c := visit(m)):
                return c
        state[n] = "done"
        stack.pop()
        return None

    for n in sorted(graph):
        if n not in state and (c := visit(n)):
            return c
    return None


def test_imports_point_one_way():
    graph = import_graph()
    assert find_cycle(graph) is None, f"an import circle: {' -> '.join(find_cycle(graph))}"
    assert graph["errors"] == []  # the bottom: the one exception type every module raises on purpose
    for low in ("configurator", "mamba2", "ops"):  # the layer above it imports nothing else of the project
        assert graph[low] == ["errors"], (low, graph[low])
    assert graph["folders"] == ["configurator", "errors"], graph["folders"]
    assert "model" not in graph["tokenizer"] and "model" not in graph["ops"]


def test_the_cycle_check_finds_a_lazy_circle(tmp_path):
    (tmp_path / "a.py").write_text("import b\n")
    (tmp_path / "b.py").write_text("def f():\n    from c import x\n")           # lazy: it counts
    (tmp_path / "c.py").write_text("import a\n")
    names = ["a", "b", "c"]
    graph = {n: module_imports(str(tmp_path / f"{n}.py"), names) for n in names}
    assert graph == {"a": ["b"], "b": ["c"], "c": ["a"]}
    assert find_cycle(graph) == ["a", "b", "c", "a"]
    (tmp_path / "c.py").write_text("if __name__ == '__main__':\n    import a\n")   # a command block: it counts too
    graph["c"] = module_imports(str(tmp_path / "c.py"), names)
    assert find_cycle(graph) == ["a", "b", "c", "a"]
    (tmp_path / "c.py").write_text("import os\n")
    graph["c"] = module_imports(str(tmp_path / "c.py"), names)
    assert find_cycle(graph) is None
