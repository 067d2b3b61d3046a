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
a literal is taken as a string (`--out_dir=out/run1`); a string starting with `~/` is expanded to the home folder.
A script may name positional settings (`configure(globals(), positional=("init_from", "out_dir"))`, as
`python export.py IN OUT` does): bare arguments fill them in order wherever they stand, and only bare arguments
ending in .py are config files.

Errors: a bad setting is one line ("error: ..."), exit code 2. configure() also installs an exception hook for the
rest of the script: an exception the project raises on purpose (a `raise` statement in one of its files: the
pre-flight checks, the refusals) is printed the same way, once (rank 0 under torchrun), with exit code 2; any other
exception is a bug and keeps its traceback. NANOMLA_TRACEBACK=1 shows the traceback of every error.
"""
import ast
import atexit
import difflib
import io
import linecache
import os
import sys
import tokenize
import traceback
import types
import typing

ROOT = os.path.dirname(os.path.abspath(__file__))

_SETTING_TYPES = (bool, int, float, str, list, tuple, dict, type(None))


class UnknownSettingError(KeyError):
    def __str__(self):  # KeyError would print its message in quotes
        return self.args[0]


def settings_of(namespace):
    """The configurable settings of a script: public module-level names bound to plain values (UPPER_CASE names
    are constants, not settings)."""
    return {k: v for k, v in namespace.items() if not k.startswith("_") and not k.isupper()
            and isinstance(v, _SETTING_TYPES)}


def pipeline_scripts(root=ROOT):
    """The project's top-level scripts: every .py file there that calls configure()."""
    out = []
    for name in sorted(os.listdir(root)):
        if name.endswith(".py") and name != "configurator.py":
            with open(os.path.join(root, name)) as f:
                if "configure(globals()" in f.read():
                    out.append(name)
    return out


def pipeline_settings(root=ROOT):
    """Names the project's scripts define as settings: their module-level assignments, and those directly inside
    an `if __name__ == "__main__":` block (read with ast, nothing is run)."""
    names = set()
    for script in pipeline_scripts(root):
        with open(os.path.join(root, script)) as f:
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
    close = difflib.get_close_matches(key, list(valid), n=3, cutoff=0.6)
    close += [k for k in valid if (key.lower() in k.lower() or k.lower() in key.lower()) and k not in close]
    hint = f" Did you mean {' or '.join(close[:3])}?" if close else ""
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


def configure(namespace, argv=None, positional=()):
    """Apply `[config_file.py] [--key=value ...]` to `namespace` (a script's globals()) in place; return the
    resolved settings. Raises KeyError for unknown keys and TypeError for wrong types. --help prints the
    settings and exits. positional: names of settings that bare arguments fill, in order (a list setting takes
    all the rest)."""
    if argv is None:  # a script's own command line: a bad setting is a one-line error, not a traceback
        install_error_hook()
        try:
            return configure(namespace, sys.argv[1:], positional)
        except (KeyError, TypeError, ValueError, FileNotFoundError) as e:
            _say(f"error: {e}")
            raise SystemExit(2)
    if any(a in ("--help", "-h") for a in argv):  # the settings as the rest of the command line resolves them
        configure(namespace, [a for a in argv if a not in ("--help", "-h")], positional)
        try:
            print(help_text(namespace), flush=True)
        except BrokenPipeError:  # `--help | head`: the reader has all it wanted
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        raise SystemExit(0)
    defaults = settings_of(namespace)
    annotations = namespace.get("__annotations__", {})
    for k, v in defaults.items():  # a None default must say what it takes (else --kv_rank=abc would pass)
        if v is None and k not in annotations:
            raise TypeError(f"setting {k!r} has the default None and no annotation saying what it takes "
                            f"(write e.g. `{k}: int | None = None` in the script)")
    free = list(positional)
    bare = {}  # positional name -> value(s), applied after the config files (the command line wins)
    for arg in argv:
        if not arg.startswith("--"):
            if free and not (arg.endswith(".py") and not os.path.isdir(arg)):
                name = free[0]
                if isinstance(defaults.get(name), list):
                    bare.setdefault(name, []).append(os.path.expanduser(arg))
                else:
                    bare[name] = os.path.expanduser(arg) if arg.startswith("~") else arg
                    free.pop(0)
                continue
            if not (arg.endswith(".py") or not positional):
                raise ValueError(f"unexpected argument {arg!r}: this script takes "
                                 f"{' '.join(n.upper() for n in positional)} as bare arguments, then --key=value")
            _apply_file(arg, namespace, defaults, annotations)
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
            namespace[key] = _check(key, _home(value), defaults[key], "command line", annotations.get(key))
    for name, value in bare.items():
        namespace[name] = _check(name, value, defaults[name], "command line", annotations.get(name))
    _check_device(namespace.get("device"))
    return {k: namespace[k] for k in defaults}


def _check_device(device):
    """A GPU asked for on a machine without one: one line now, not a CUDA traceback after the model is read."""
    if isinstance(device, str) and device.startswith("cuda"):
        import torch  # only here: the configurator itself needs nothing beyond the standard library
        if not torch.cuda.is_available():
            raise ValueError(f"device={device!r}, but this torch sees no GPU (torch {torch.__version__}, "
                             "torch.cuda.is_available() is False). Fix: --device=cpu (or auto), or install the "
                             "torch build for your CUDA / ROCm")


def _apply_file(path, namespace, defaults, annotations):
    """A config file: plain assignments, executed in a scratch namespace so only its settings are taken."""
    scope = {}
    try:
        with open(path) as f:
            code = f.read()
    except FileNotFoundError:
        raise FileNotFoundError(f"config file {path!r} not found (settings are --key=value; files are paths)") from None
    try:
        exec(compile(code, path, "exec"), scope)
    except Exception as e:  # a typo in the file: name the file and line, not a traceback
        line = e.lineno if isinstance(e, SyntaxError) else next(
            (f.lineno for f in reversed(traceback.extract_tb(e.__traceback__)) if f.filename == path), "?")
        raise ValueError(f"config file {path}, line {line}: {type(e).__name__}: "
                         f"{e.msg if isinstance(e, SyntaxError) else e}. Fix: a config file holds plain "
                         "assignments (name = Python literal)") from None
    others = None
    for key, value in settings_of(scope).items():
        if key not in defaults:
            others = pipeline_settings() if others is None else others
            if key in others:
                continue  # another script's setting (e.g. distill.py's lr in a file svd_init.py reads)
            raise _unknown(key, defaults, path)
        namespace[key] = _check(key, _home(value), defaults[key], path, annotations.get(key))


def _home(value):
    """`~/x` paths expanded (a shell leaves --out_dir=~/x alone: the ~ follows '=')."""
    if isinstance(value, str) and (value == "~" or value.startswith("~/")):
        return os.path.expanduser(value)
    if isinstance(value, (list, tuple)):
        return type(value)(_home(v) for v in value)
    return value


def require(config, **bounds):
    """Range checks of numeric settings: require(config, micro_batch=(1, None), limit=(0, None)) raises a ValueError
    naming the setting unless lo <= value <= hi (None: unbounded). For settings a script would otherwise divide by,
    loop on or slice with."""
    for name, (lo, hi) in bounds.items():
        v = config[name]
        if v is None:
            continue
        if (lo is not None and v < lo) or (hi is not None and v > hi):
            rule = f">= {lo}" if hi is None else f"<= {hi}" if lo is None else f"in [{lo}, {hi}]"
            raise ValueError(f"{name}={v!r}: must be {rule}")


# -----------------------------------------------------------------------------
# Errors the project raises on purpose, shown as one line


def _master():
    return os.environ.get("RANK", "0") == "0"


def _say(msg):
    if _master():  # torchrun: every rank runs the same checks; one message is enough
        # the real stderr: torch.distributed's own excepthook captures sys.stderr around ours to prefix "[rank0]:",
        # and os._exit below would drop what it captured
        print(msg, file=sys.__stderr__, flush=True)


def _ours(tb):
    """Whether the innermost frame of a traceback is a `raise` statement in one of the project's files."""
    while tb.tb_next is not None:
        tb = tb.tb_next
    path = os.path.abspath(tb.tb_frame.f_code.co_filename)
    if not path.startswith(ROOT + os.sep) or os.sep + "site-packages" + os.sep in path:
        return False
    return linecache.getline(path, tb.tb_lineno).lstrip().startswith("raise")


def _hook(kind, err, tb):
    if not issubclass(kind, Exception) or issubclass(kind, AssertionError) or tb is None or not _ours(tb) \
            or os.environ.get("NANOMLA_TRACEBACK"):
        return sys.__excepthook__(kind, err, tb)
    _say(f"error: {err}")
    sys.stdout.flush()
    atexit._run_exitfuncs()  # what the run registered (its out_dir lock) is released before the exit
    os._exit(2)              # skip the interpreter's teardown (and gloo's noise about peers that left)


def install_error_hook():
    sys.excepthook = _hook
