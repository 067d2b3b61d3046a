"""
One config mechanism for every script, nanoGPT-style: a script defines its settings as plain module-level
assignments, then calls `config = configure(globals())`, which applies an optional config file (a .py of plain
assignments, e.g. config/llama1b_kv64.py), then `--key=value` overrides, and returns the resolved settings as a dict
(saved with every checkpoint and result). Unlike nanoGPT's exec-into-globals, mistakes are errors that say what is
valid: an unknown key ("did you mean"), a value not of the default's type (a None default says what it takes with
an annotation, `kv_rank: int | None = None`), a number out of range (`require`). Values are Python literals
(`--mla_layers=[1,3]`), anything else a string; `~/` is expanded. `--help` prints each setting, its default and
the comment beside it. A script may name positional settings (`python export.py IN OUT`). A config file may hold
settings of the project's other scripts (one file serves svd_init.py and distill.py): those are skipped, typos not.

Errors: configure() installs a hook so that an errors.Refusal (what the project raises on purpose) prints as one
line, once under torchrun, exit code 2; any other exception is a bug and keeps its traceback (NANOMLA_TRACEBACK=1
shows them all).
"""
import ast
import dataclasses
import difflib
import inspect
import io
import os
import sys
import textwrap
import tokenize
import traceback
import types
import typing

from errors import BadInput, BadType, NotFound, Refusal, UnknownSetting

ROOT = os.path.dirname(os.path.abspath(__file__))
SCRIPTS = ("svd_init.py", "distill.py", "dpo.py", "evaluate.py", "zebra.py", "export.py", "bench.py", "data.py",
           "model.py", "tokenizer.py")  # the top-level scripts (a shared config file may be meant for any of them)
_TYPES = (bool, int, float, str, list, tuple, dict, type(None))


class Settings:
    """A group of settings that travels as one object: a dataclass deriving from this (svd_init.Conversion). A script
    that holds an instance at module level takes its fields as settings of its own (`--kv_rank=8`, flat names, as
    if each were a module-level assignment), with the instance's values as defaults; configure() writes the resolved
    values back into the instance."""


def _groups(namespace):
    return [v for k, v in namespace.items() if not k.startswith("_") and isinstance(v, Settings)]


def settings_of(namespace):
    """A script's settings: public module-level names bound to plain values (UPPER_CASE names are constants), and
    the fields of its Settings groups."""
    out = {k: v for k, v in namespace.items() if not k.startswith("_") and not k.isupper() and isinstance(v, _TYPES)}
    for g in _groups(namespace):
        for f in dataclasses.fields(g):
            if f.name in out:
                raise TypeError(f"setting {f.name!r} is both a module-level name and a field of {type(g).__name__}")
            out[f.name] = getattr(g, f.name)
    return out


def _annotations(namespace):
    return {**{f.name: f.type for g in _groups(namespace) for f in dataclasses.fields(g)},
            **namespace.get("__annotations__", {})}


def _put(namespace, key, value):
    owner = next((g for g in _groups(namespace) if key in {f.name for f in dataclasses.fields(g)}), None)
    setattr(owner, key, value) if owner is not None else namespace.__setitem__(key, value)


def pipeline_settings(root=ROOT):
    """Every setting name of the project's scripts: assignments at module level or in the `__main__` block, and the
    fields of Settings classes (ast)."""
    names = set()
    for script in SCRIPTS:
        tree = ast.parse(open(os.path.join(root, script)).read())
        body = list(tree.body) + [n for node in tree.body if isinstance(node, ast.If) for n in node.body]
        body += [n for node in tree.body if isinstance(node, ast.ClassDef)
                 and any(ast.unparse(b) == "Settings" for b in node.bases) for n in node.body]
        names |= {t.id for n in body if isinstance(n, ast.Assign) for t in n.targets if isinstance(t, ast.Name)}
        names |= {n.target.id for n in body if isinstance(n, ast.AnnAssign) and isinstance(n.target, ast.Name)}
    return names


def _allowed(key, default, annotation):
    """The types a setting takes: its annotation's (`int | None`), else its default's."""
    if annotation is None:
        if default is None:
            raise BadType(f"setting {key!r} has the default None and no annotation saying what it takes "
                          f"(write e.g. `{key}: int | None = None` in the script)")
        return (type(default),)
    union = isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union
    return typing.get_args(annotation) if union else (annotation,)


def _check(key, value, default, source, annotation=None):
    """`value` as the setting's type (an int where a float is expected becomes a float), or a BadType."""
    allowed = _allowed(key, default, annotation)
    for t in allowed:
        if value is None and t is type(None):
            return None
        if t is float and type(value) is int:
            return float(value)
        if t in (list, tuple) and isinstance(value, (list, tuple)):
            return _home(t(value))
        if isinstance(value, t) and not (t is int and isinstance(value, bool)):  # True is not a number here
            return _home(value)
    names = f"a {allowed[0].__name__} (default {default!r})" if annotation is None else \
        " or ".join("None" if t is type(None) else t.__name__ for t in allowed)
    hint = f" (e.g. [{value!r}])" if list in allowed and not isinstance(value, (list, tuple)) else ""
    raise BadType(f"{source}: {key}={value!r} is a {type(value).__name__}, but {key} takes {names}{hint}")


def _home(value):
    """`~/x` paths expanded (a shell leaves --out_dir=~/x alone: the ~ follows '=')."""
    if isinstance(value, str) and (value == "~" or value.startswith("~/")):
        return os.path.expanduser(value)
    return type(value)(_home(v) for v in value) if isinstance(value, (list, tuple)) else value


def _unknown(key, valid, source):
    close = difflib.get_close_matches(key, list(valid), n=3, cutoff=0.6)
    close += [k for k in valid if (key.lower() in k.lower() or k.lower() in key.lower()) and k not in close]
    hint = f" Did you mean {' or '.join(close[:3])}?" if close else ""
    return UnknownSetting(f"{source}: unknown setting {key!r}.{hint} Valid settings: {', '.join(sorted(valid))}")


def help_text(namespace):
    """The script's docstring head, then each setting, its default and the comment beside it (read with tokenize)."""
    doc = "\n\n".join((namespace.get("__doc__") or "").strip().split("\n\n")[:2])
    comments, name = {}, None  # the setting assigned on the current logical line; its trailing comment is its help
    here = os.path.abspath(namespace["__file__"])
    sources = [open(here).read()] + [textwrap.dedent(inspect.getsource(type(g)).split("\n    def ")[0])  # fields only
                                     for g in _groups(namespace) if inspect.getsourcefile(type(g)) != here]
    toks = [t for src in sources for t in tokenize.generate_tokens(io.StringIO(src).readline)]
    above = None  # (setting, its column) of the line above: a comment-only line indented past it continues it
    for i, tok in enumerate(toks):
        if tok.type == tokenize.NAME and name is None and i + 1 < len(toks) and toks[i + 1].string in "=:" and (
                i == 0 or toks[i - 1].type in (tokenize.NEWLINE, tokenize.NL, tokenize.INDENT, tokenize.COMMENT)):
            name, col = tok.string, tok.start[1]
        elif tok.type == tokenize.COMMENT and (name is not None or (above is not None and tok.start[1] > above[1])):
            comments.setdefault(name or above[0], []).append(tok.string.lstrip("#").strip())
        elif tok.type == tokenize.NEWLINE:
            name, above = None, (name, col) if name is not None else None
        elif tok.type not in (tokenize.NL, tokenize.COMMENT, tokenize.INDENT, tokenize.DEDENT):
            above = None
    lines = [doc, "", "settings (a config file, then --key=value; values are Python literals):"]
    annotations = _annotations(namespace)
    for k, v in settings_of(namespace).items():
        ann = annotations.get(k)
        ann = None if isinstance(ann, type) else ann  # `int | None` says what a None takes; `int` says nothing new
        note = " ".join(comments.get(k, []))
        lines.append(f"  --{k}={v!r}" + (f" ({ann})" if ann is not None else "") + (f"\n        {note}" if note else ""))
    return "\n".join(lines)


def configure(namespace, argv=None, positional=()):
    """Apply `[config_file.py] [--key=value ...]` to `namespace` (a script's globals()) in place and return the
    resolved settings. positional: settings that bare arguments fill, in order (a list setting takes the rest)."""
    if argv is None:  # a script's own command line: its refusals print as one line from here on
        sys.excepthook = _hook
        try:
            return configure(namespace, sys.argv[1:], positional)
        except Refusal as e:
            _hook(type(e), e, None)  # exits, unless NANOMLA_TRACEBACK asks for the traceback
            raise
    if any(a in ("--help", "-h") for a in argv):  # the settings as the rest of the command line resolves them
        configure(namespace, [a for a in argv if a not in ("--help", "-h")], positional)
        try:
            print(help_text(namespace), flush=True)
        except BrokenPipeError:  # `--help | head`: the reader has all it wanted
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        raise SystemExit(0)
    defaults, annotations = settings_of(namespace), _annotations(namespace)
    for k, v in defaults.items():  # a None default must say what it takes (else --kv_rank=abc would pass)
        _check(k, v, v, "the script", annotations.get(k))
    free, bare = list(positional), {}  # bare arguments are applied after the config files: the command line wins
    for arg in argv:
        if arg.startswith("--"):
            key, eq, text = arg[2:].partition("=")
            if not eq:
                raise BadInput(f"{arg!r}: settings are given as --key=value")
            if key not in defaults:
                raise _unknown(key, defaults, "command line")
            try:
                value = ast.literal_eval(text)
            except (ValueError, SyntaxError):
                value = text
            allowed = _allowed(key, defaults[key], annotations.get(key))
            if str in allowed and value is not None and not any(type(value) is t for t in allowed):
                value = text  # --out_dir=123 is the string "123" for a string setting
            _put(namespace, key, _check(key, value, defaults[key], "command line", annotations.get(key)))
        elif free and not (arg.endswith(".py") and not os.path.isdir(arg)):
            if isinstance(defaults.get(free[0]), list):
                bare.setdefault(free[0], []).append(os.path.expanduser(arg))
            else:
                bare[free.pop(0)] = os.path.expanduser(arg)
        elif arg.endswith(".py") or not positional:
            _apply_file(arg, namespace, defaults, annotations)
        else:
            raise BadInput(f"unexpected argument {arg!r}: this script takes "
                           f"{' '.join(n.upper() for n in positional)} as bare arguments, then --key=value")
    for name, value in bare.items():
        _put(namespace, name, _check(name, value, defaults[name], "command line", annotations.get(name)))
    device = namespace.get("device")
    if isinstance(device, str) and device.startswith("cuda"):  # one line now, not a CUDA traceback later
        import torch  # only here: the configurator itself needs nothing beyond the standard library
        if not torch.cuda.is_available():
            raise BadInput(f"device={device!r}, but this torch sees no GPU (torch {torch.__version__}, "
                           "torch.cuda.is_available() is False). Fix: --device=cpu (or auto), or install the "
                           "torch build for your CUDA / ROCm")
    return settings_of(namespace)


def _apply_file(path, namespace, defaults, annotations):
    """A config file: plain assignments, executed in a scratch namespace so only its settings are taken."""
    if not os.path.isfile(path):
        raise NotFound(f"config file {path!r} not found (settings are --key=value; files are paths)")
    scope, others = {}, None
    try:
        exec(compile(open(path).read(), path, "exec"), scope)
    except Exception as e:  # a typo in the file: name the file and line, not a traceback
        line = e.lineno if isinstance(e, SyntaxError) else next(
            (f.lineno for f in reversed(traceback.extract_tb(e.__traceback__)) if f.filename == path), "?")
        raise BadInput(f"config file {path}, line {line}: {type(e).__name__}: "
                       f"{e.msg if isinstance(e, SyntaxError) else e}. Fix: a config file holds plain "
                       "assignments (name = Python literal)") from None
    for key, value in settings_of(scope).items():
        if key not in defaults:
            others = pipeline_settings() if others is None else others
            if key in others:
                continue  # another script's setting (e.g. distill.py's lr in a file svd_init.py reads)
            raise _unknown(key, defaults, path)
        _put(namespace, key, _check(key, value, defaults[key], path, annotations.get(key)))


def require(config, **bounds):
    """Range checks: require(config, micro_batch=(1, None)) refuses a value outside [lo, hi] (None: unbounded)."""
    for name, (lo, hi) in bounds.items():
        v = config[name]
        if v is not None and ((lo is not None and v < lo) or (hi is not None and v > hi)):
            rule = f">= {lo}" if hi is None else f"<= {hi}" if lo is None else f"in [{lo}, {hi}]"
            raise BadInput(f"{name}={v!r}: must be {rule}")


# -----------------------------------------------------------------------------
# A refusal ends the script with one line; what it registered to undo (its out_dir lock) is undone first

_AT_EXIT = []


def at_exit(fn, *args):
    """Run fn(*args) when the script ends, however it ends (atexit, and before a refusal's fast exit)."""
    import atexit
    atexit.register(fn, *args)
    _AT_EXIT.append((fn, args))


def run_exit_handlers():
    while _AT_EXIT:
        fn, args = _AT_EXIT.pop()
        fn(*args)


def _hook(kind, err, tb):
    if not isinstance(err, Refusal) or os.environ.get("NANOMLA_TRACEBACK"):
        return sys.__excepthook__(kind, err, tb)
    if os.environ.get("RANK", "0") == "0":  # torchrun: every rank runs the same checks; one message is enough
        # the real stderr: torch.distributed's excepthook captures sys.stderr around ours to prefix "[rank0]:"
        print(f"error: {err}", file=sys.__stderr__, flush=True)
    sys.stdout.flush()
    run_exit_handlers()
    os._exit(2)  # skip the interpreter's teardown (and gloo's noise about peers that left)
