"""
One config mechanism for every script, nanoGPT-style: a script defines its settings as plain module-level
assignments, then calls

    config = configure(globals())          # reads sys.argv[1:]

which applies, in order, an optional config file (a .py of plain assignments, e.g. config/llama1b_kv64.py) and then
`--key=value` overrides, and returns the resolved settings as a dict (save it with every checkpoint and result).

Unlike nanoGPT's exec-into-globals, unknown keys and wrong types are errors that list what is valid:
    - a key must already exist in the script's settings (a typo never silently does nothing);
    - the value must have the default's type: bool stays bool, int stays int, a float setting also takes an int,
      list/tuple settings take a list or tuple. A setting whose default is None says what else it takes with an
      annotation (`kv_rank: int | None = None`); an unannotated None default is a bug in the script.
`--help` (or -h) prints the settings block (each setting, its default and the comment beside it) and exits.
A config file describes a run of the whole pipeline, so one file can serve several scripts
(`python svd_init.py config/llama1b_kv64.py`, `torchrun distill.py config/llama1b_kv64.py`): a key in a FILE that this
script lacks but another of the project's scripts has (svd_init.py, distill.py, dpo.py, evaluate.py) is skipped;
a key no script has is an error. On the command line every key must be this script's.
Values after `=` are Python literals (`--lr=3e-4`, `--mla_layers=[1,3,5]`, `--init_from=None`); anything that is not
a literal is taken as a string (`--out_dir=out/run1`).
"""
import ast
import io
import os
import sys
import tokenize
import types
import typing

PIPELINE_SCRIPTS = ("svd_init.py", "distill.py", "dpo.py", "evaluate.py")

_SETTING_TYPES = (bool, int, float, str, list, tuple, dict, type(None))


class UnknownSettingError(KeyError):
    def __str__(self):  # KeyError would print its message in quotes
        return self.args[0]


def settings_of(namespace):
    """The configurable settings of a script: public module-level names bound to plain values (UPPER_CASE names
    are constants, not settings)."""
    return {k: v for k, v in namespace.items() if not k.startswith("_") and not k.isupper()
            and isinstance(v, _SETTING_TYPES)}


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
        names |= {n.target.id for n in body if isinstance(n, ast.AnnAssign) and isinstance(n.target, ast.Name)}
    return names


def _allowed(annotation):
    """The plain types an annotation like `int | None` or `list | None` admits."""
    if annotation is None:
        return None
    if isinstance(annotation, str):  # `from __future__ import annotations` style
        annotation = eval(annotation, {"typing": typing})
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        return tuple(a for a in typing.get_args(annotation))
    return (annotation,)


def _check(key, value, default, source, annotation=None):
    if default is None or annotation is not None:  # the annotation, when there is one, says what it takes
        allowed = _allowed(annotation)
        if allowed is None:
            raise TypeError(f"setting {key!r} has the default None and no annotation saying what it takes "
                            f"(write e.g. `{key}: int | None = None` in the script)")
        if value is None:
            return None
        for t in allowed:
            if t is type(None):
                continue
            if t is bool and not isinstance(value, bool):
                continue
            try:
                return _check(key, value, t(), source)
            except TypeError:
                pass
        names = " or ".join("None" if t is type(None) else t.__name__ for t in allowed)
        hint = f" (e.g. [{value!r}])" if list in allowed and not isinstance(value, (list, tuple)) else ""
        raise TypeError(f"{source}: {key}={value!r} is a {type(value).__name__}, but {key} takes {names}{hint}")
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


def help_text(namespace):
    """The settings block of the script that owns `namespace`, as help: name, default, the comment beside it."""
    doc = "\n\n".join((namespace.get("__doc__") or "").strip().split("\n\n")[:2])  # what it is, how to run it
    comments, path = {}, namespace.get("__file__")
    if path and os.path.exists(path):
        with open(path) as f:
            toks = list(tokenize.generate_tokens(io.StringIO(f.read()).readline))
        name = None  # the setting assigned on the current logical line; its trailing comment is its help
        for i, tok in enumerate(toks):
            if tok.type == tokenize.NAME and name is None and i + 1 < len(toks) and toks[i + 1].string in "=:" \
                    and (i == 0 or toks[i - 1].type in (tokenize.NEWLINE, tokenize.NL, tokenize.INDENT,
                                                        tokenize.DEDENT, tokenize.COMMENT)):
                name = tok.string
            elif tok.type == tokenize.COMMENT and name is not None:
                comments.setdefault(name, []).append(tok.string.lstrip("#").strip())
            elif tok.type == tokenize.NEWLINE:
                name = None
    lines = [doc, "", "settings (a config file, then --key=value; values are Python literals):"]
    for k, v in settings_of(namespace).items():
        ann = namespace.get("__annotations__", {}).get(k)
        kind = f" ({ann})" if ann is not None else ""
        note = " ".join(comments.get(k, []))
        lines.append(f"  --{k}={v!r}{kind}" + (f"\n        {note}" if note else ""))
    return "\n".join(lines)


def configure(namespace, argv=None):
    """Apply `[config_file.py] [--key=value ...]` to `namespace` (a script's globals()) in place; return the
    resolved settings. Raises KeyError for unknown keys and TypeError for wrong types. --help prints the
    settings and exits."""
    if argv is None:  # a script's own command line: a bad setting is a one-line error, not a traceback
        try:
            return configure(namespace, sys.argv[1:])
        except (KeyError, TypeError, ValueError, FileNotFoundError) as e:
            print(f"error: {e}", file=sys.stderr)
            raise SystemExit(2)
    if any(a in ("--help", "-h") for a in argv):
        print(help_text(namespace))
        raise SystemExit(0)
    defaults = settings_of(namespace)
    annotations = namespace.get("__annotations__", {})
    for k, v in defaults.items():  # a None default must say what it takes (else --kv_rank=abc would pass)
        if v is None and k not in annotations:
            raise TypeError(f"setting {k!r} has the default None and no annotation saying what it takes "
                            f"(write e.g. `{k}: int | None = None` in the script)")
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
                namespace[key] = _check(key, value, defaults[key], arg, annotations.get(key))
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
            allowed = _allowed(annotations.get(key)) or (type(defaults[key]),)
            if str in allowed and not isinstance(value, str) and value is not None and not any(
                    type(value) is t for t in allowed):
                value = text  # --out_dir=123 is the string "123" for a string setting
            namespace[key] = _check(key, value, defaults[key], "command line", annotations.get(key))
    return {k: namespace[k] for k in defaults}
