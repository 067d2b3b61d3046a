"""configurator.py: config file then --key=value, clear errors for unknown keys and wrong types."""
import pytest

from configurator import configure


def settings():
    return dict(lr=1e-3, batch_size=8, compile=False, out_dir="out", mla_layers=[0, 1], q_energy=None,
                _private=3, os=pytest,  # these two are not settings
                __annotations__={"q_energy": float | None})


def test_file_then_overrides(tmp_path):
    f = tmp_path / "cfg.py"
    f.write_text("import math\nlr = 3e-4\nbatch_size = 4\nmla_layers = (1, 3)\n_tmp = math.pi\n")
    ns = settings()
    cfg = configure(ns, [str(f), "--batch_size=16", "--compile=True", "--out_dir=runs/a", "--q_energy=0.95",
                         "--lr=1"])
    assert cfg == dict(lr=1.0, batch_size=16, compile=True, out_dir="runs/a", mla_layers=[1, 3], q_energy=0.95)
    assert ns["batch_size"] == 16 and isinstance(ns["lr"], float)


def test_unknown_key_lists_valid(tmp_path):
    with pytest.raises(KeyError, match="unknown setting 'batchsize'.*Valid settings: .*batch_size"):
        configure(settings(), ["--batchsize=3"])
    f = tmp_path / "cfg.py"
    f.write_text("learning_rate = 1.0\n")
    with pytest.raises(KeyError, match="cfg.py: unknown setting 'learning_rate'"):
        configure(settings(), [str(f)])


@pytest.mark.parametrize("arg,msg", [("--batch_size=2.5", "batch_size takes a int"),
                                     ("--compile=1", "compile takes a bool"),
                                     ("--lr=True", "lr takes a float"),
                                     ("--mla_layers=3", "mla_layers takes a list")])
def test_wrong_types(arg, msg):
    with pytest.raises(TypeError, match=msg):
        configure(settings(), [arg])


def test_strings_and_malformed():
    assert configure(settings(), ["--out_dir=123"])["out_dir"] == "123"
    with pytest.raises(ValueError, match="--key=value"):
        configure(settings(), ["--compile"])
    with pytest.raises(FileNotFoundError, match="config file"):
        configure(settings(), ["nope.py"])


def test_a_file_may_hold_other_scripts_settings(tmp_path):
    """config/llama1b_kv64.py serves svd_init.py and distill.py: distill's keys are skipped by svd_init, typos not."""
    f = tmp_path / "cfg.py"
    f.write_text("batch_size = 2\nkl_weight = 1.0\ntokens_per_step = 4096\n")   # kl_weight etc. are distill.py's
    assert configure(settings(), [str(f)])["batch_size"] == 2
    f.write_text("kl_wieght = 1.0\n")
    with pytest.raises(KeyError, match="unknown setting 'kl_wieght'"):
        configure(settings(), [str(f)])
    with pytest.raises(KeyError, match="unknown setting 'kl_weight'"):             # the command line is strict
        configure(settings(), ["--kl_weight=1.0"])


def script_defaults(script):
    """A script's settings and their defaults, read with ast (module level and the __main__ block)."""
    import ast
    import os
    tree = ast.parse(open(os.path.join(os.path.dirname(__file__), "..", script)).read())
    body = list(tree.body) + [n for node in tree.body if isinstance(node, ast.If) for n in node.body]
    out, annotations = {}, {}
    for n in body:
        if isinstance(n, ast.Assign) and "configure(" in ast.unparse(n.value):
            break  # what a script assigns after configure() is not a setting
        if isinstance(n, ast.Assign) and isinstance(n.value, ast.Call) and ast.unparse(n.value.func) == "Conversion":
            from svd_init import Conversion  # a group of settings (configurator.Settings), as the script holds it
            out[n.targets[0].id] = Conversion(**{k.arg: ast.literal_eval(k.value) for k in n.value.keywords})
        elif isinstance(n, ast.Assign) and len(n.targets) == 1 and isinstance(n.targets[0], ast.Name):
            try:
                out[n.targets[0].id] = ast.literal_eval(n.value)
            except ValueError:
                pass
        elif isinstance(n, ast.AnnAssign) and isinstance(n.target, ast.Name) and n.value is not None:
            out[n.target.id] = ast.literal_eval(n.value)
            annotations[n.target.id] = eval(ast.unparse(n.annotation))
    if annotations:
        out["__annotations__"] = annotations
    return out


def test_every_config_file_loads_in_every_script():
    import copy
    import glob
    import os
    files = glob.glob(os.path.join(os.path.dirname(__file__), "..", "config", "*.py"))
    assert len(files) > 30
    for script in ("svd_init.py", "distill.py", "dpo.py"):
        defaults = script_defaults(script)
        assert "init_from" in defaults and len(defaults) > 10
        for f in files:
            configure(copy.deepcopy(defaults), [f])   # raises on a key no script knows or a wrong type


def test_none_defaults_are_typed_by_their_annotation():
    ns = dict(kv_rank=None, mla_layers=None, resume=False, out="x",
              __annotations__={"kv_rank": int | None, "mla_layers": list | None, "resume": bool | str})
    assert configure(dict(ns), ["--kv_rank=8", "--mla_layers=[1, 2]", "--resume=auto"]) == \
        dict(kv_rank=8, mla_layers=[1, 2], resume="auto", out="x")
    assert configure(dict(ns), ["--resume=True"])["resume"] is True
    with pytest.raises(TypeError, match="kv_rank='abc' is a str, but kv_rank takes int or None"):
        configure(dict(ns), ["--kv_rank=abc"])
    with pytest.raises(TypeError, match=r"mla_layers takes list or None \(e.g. \[3\]\)"):
        configure(dict(ns), ["--mla_layers=3"])
    with pytest.raises(TypeError, match="no annotation"):                  # a script bug, said plainly
        configure(dict(q=None), [])


def test_help_lists_settings_with_their_comments(tmp_path, capsys):
    script = tmp_path / "s.py"
    script.write_text('"""A script.\n\n    python s.py\n"""\nlr = 0.1          # the learning rate\n'
                      'kv_rank: int | None = None   # r_kv\n')
    ns = {"__file__": str(script), "__doc__": "A script.\n\n    python s.py\n", "lr": 0.1, "kv_rank": None,
          "__annotations__": {"kv_rank": int | None}}
    with pytest.raises(SystemExit) as e:
        configure(ns, ["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "python s.py" in out and "--lr=0.1\n        the learning rate" in out and "--kv_rank=None (int | None)" in out


def test_a_settings_group_takes_its_fields_as_settings(tmp_path, capsys):
    from svd_init import Conversion
    conv = Conversion(init="rorope", kv_rank=16)                      # a script's own defaults for the group
    cfg_file = tmp_path / "c.py"
    cfg_file.write_text("kv_budget = 0.5\nkv_rank = None\nlr = 0.2\n")
    ns = dict(lr=0.1, conversion=conv)
    config = configure(ns, [str(cfg_file), "--rope_fold=4", "--mla_layers=[0, 2]"])
    assert (conv.kv_budget, conv.kv_rank, conv.rope_fold, conv.mla_layers, conv.init) == (0.5, None, 4, [0, 2], "rorope")
    assert config["kv_budget"] == 0.5 and config["lr"] == 0.2 and "conversion" not in config   # flat, as saved
    with pytest.raises(TypeError, match="kv_rank=.abc. is a str, but kv_rank takes int or None"):
        configure(dict(conversion=Conversion()), ["--kv_rank=abc"])    # typed by the field's annotation
    with pytest.raises(KeyError, match="Did you mean kv_budget"):
        configure(dict(conversion=Conversion()), ["--kv_budgte=0.5"])
    with pytest.raises(TypeError, match="both a module-level name and a field of Conversion"):
        configure(dict(conversion=Conversion(), kv_rank=3), [])        # a script bug: one name, two meanings
    script = tmp_path / "s.py"
    script.write_text("conversion = None\n")
    with pytest.raises(SystemExit):
        configure(dict(__file__=str(script), __doc__="S.", conversion=Conversion()), ["--help"])
    out = capsys.readouterr().out                                      # the fields' comments, from svd_init.py
    assert "--kv_budget=None (float | None)\n        instead of kv_rank: a fraction" in out
    assert "--rope_fold=None (int | None)\n        rorope: fold 1, 2, 4 or 8" in out and "(1: exact rotation" in out
