"""
One config mechanism for every script, nanoGPT-style: a script defines its settings as plain module-level
assignments, then calls

    config = configure(globals())          # reads sys.argv[1:]

which applies, in order, an optional config file (a .py of plain assignments, e.g. config/llama1b_kv64.py) and then
`--key=value` overrides, and returns the resolved settings as a dict (save it with every checkpoint and result).

Unlike nanoGPT's exec-into-globals, unknown keys and wrong types are errors that list what is valid:
    - a key must already exist in the script's settings (a typo never silently does nothing);
    - the value must have the default's type: bool stays bool, int stays int, a float setting also takes an int,
      list/tuple settings take a list or tuple, and a setting whose default is None takes anything.
A config file describes a run of the whole pipeline, so one file can serve several scripts
(`python svd_init.py config/llama1b_kv64.py`, `torchrun distill.py config/llama1b_kv64.py`): a key in a FILE that this
script lacks but another of the project's scripts has (svd_init.py, distill.py, dpo.py, evaluate.py) is skipped;
a key no script has is an error. On the command line every key must be this script's.
Values after `=` are Python literals (`--lr=3e-4`, `--mla_layers=[1,3,5]`, `--init_from=None`); anything that is not
a literal is taken as a string (`--out_dir=out/run1`).
"""
import ast
import os
import sys

PIPELINE_SCRIPTS = ("svd_init.py", "distill.py", "dpo.py", "evaluate.py")

_SETTING_TYPES = (bool, int, float, str, list, tuple, dict, type(None))


class UnknownSettingError(KeyError):
    def __str__(self):  # KeyError would print its message in quotes
        return self.args[0]


def settings_of(namespace):
    """The configurable settings of a script: public module-level names bound to plain values."""
    return {k: v for k, v in namespace.items() if not k.startswith("_") and isinstance(v, _SETTING_TYPES)}


def pipeline_settings(root=os.path.dirname(os.path.abspath(__file__))):
    """Names the project's scripts define as settings: their module-level assignments, and those directly inside
    an `if __name__ == "__main__":` block (read with ast, nothing is run)."""
    names = set()
    for script in PIPELINE_SCRIPTS:
        path = os.path.join(root, script)
        if not os.path.exists(path):
            continue
        with open(path) as f:
            tree = ast.parse(f.read())
        body = list(tree.body)
        body += [n for node in tree.body if isinstance(node, ast.If) for n in node.body]
        names |= {t.id for n in body if isinstance(n, ast.Assign) for t in n.targets if isinstance(t, ast.Name)}
    return names


def _check(key, value, default, source):
    if default is None:
        return value
    if isinstance(default, bool):
        ok = isinstance(value, bool)
    elif isinstance(default, int):
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif isinstance(default, float):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    elif isinstance(default, (list, tuple)):
        ok = isinstance(value, (list, tuple))
        value = type(default)(value) if ok else value
    else:
        ok = isinstance(value, type(default))
    if not ok:
        raise TypeError(f"{source}: {key}={value!r} is a {type(value).__name__}, but {key} takes a "
                        f"{type(default).__name__} (default {default!r})")
    return value


def _unknown(key, valid, source):
    close = [k for k in valid if key.lower() in k.lower() or k.lower() in key.lower()]
    hint = f" Did you mean {', '.join(close)}?" if close else ""
    return UnknownSettingError(f"{source}: unknown setting {key!r}.{hint} Valid settings: {', '.join(sorted(valid))}")


def configure(namespace, argv=None):
    """Apply `[config_file.py] [--key=value ...]` to `namespace` (a script's globals()) in place; return the
    resolved settings. Raises KeyError for unknown keys and TypeError for wrong types."""
    argv = sys.argv[1:] if argv is None else argv
    defaults = settings_of(namespace)
    for arg in argv:
        if not arg.startswith("--"):
            # a config file: plain assignments, executed in a scratch namespace so only its settings are taken
            scope = {}
            try:
                with open(arg) as f:
                    exec(compile(f.read(), arg, "exec"), scope)
            except FileNotFoundError:
                raise FileNotFoundError(f"config file {arg!r} not found (settings are --key=value; files are paths)")
            others = None
            for key, value in settings_of(scope).items():
                if key not in defaults:
                    others = pipeline_settings() if others is None else others
                    if key in others:
                        continue  # another script's setting (e.g. distill.py's lr in a file svd_init.py reads)
                    raise _unknown(key, defaults, arg)
                namespace[key] = _check(key, value, defaults[key], arg)
        else:
            if "=" not in arg:
                raise ValueError(f"{arg!r}: settings are given as --key=value")
            key, text = arg[2:].split("=", 1)
            if key not in defaults:
                raise _unknown(key, defaults, "command line")
            try:
                value = ast.literal_eval(text)
            except (ValueError, SyntaxError):
                value = text
            if isinstance(defaults[key], str) and not isinstance(value, str) and value is not None:
                value = text  # --out_dir=123 is the string "123" for a string setting
            namespace[key] = _check(key, value, defaults[key], "command line")
    return {k: namespace[k] for k in defaults}
