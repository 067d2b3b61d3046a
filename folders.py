"""
Folders in and out: the bottom layer the rest of the project stands on. A model folder or hub id resolved, its
config.json read, its safetensors listed (never pickle); a folder written atomically with the record of what was
written into it; and the rules for what a script may replace or delete.

The rule (docs/safety.md, "What the project writes"): the project replaces or deletes only what it wrote,
recognised by name and kind, never by a prefix:
  - a model folder (svd_init.py, zebra.py, export.py, a run's `final`) is replaced only when it is empty or holds
    exactly the files its WRITTEN_BY.json lists; anything else there, a symbolic link included, is refused;
  - a training run's out_dir holds the names in RUN_NAMES (`ckpt-0000200`, `final`, `distill.txt`, ...); any other
    entry, or a link, makes the whole folder refused before any work;
  - a results file (evaluate.py --out) is replaced only when it is one this project wrote (its "written_by" key);
  - no output may be, contain or lie inside an input (check_apart): a conversion never writes over its source.
Temporary files get unique names (mkdtemp / mkstemp), so no user file can share one.
"""
import json
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import zlib

from configurator import at_exit
from errors import BadInput, Busy, CannotWrite, NotFound, Occupied

WRITTEN_BY = "WRITTEN_BY.json"  # what write_folder wrote into a folder: the only files it may later replace
PROJECT = "nanoMLA"


def write_json(path, obj):
    with open(path, "w") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")


def _show(names, n=5):
    names = sorted(names)
    return ", ".join(names[:n]) + (" ..." if len(names) > n else "")


# -----------------------------------------------------------------------------
# Reading a model folder


def resolve_checkpoint(path, need_config=True):
    """A local folder as is; otherwise a hub id ('org/name'), fetched by huggingface_hub (config, safetensors,
    tokenizer files). A string that names a local path (it exists in part, or starts with . / ~) is never a hub id."""
    path = os.path.expanduser(str(path))
    if os.path.isdir(path):
        if need_config and not os.path.exists(os.path.join(path, "config.json")):
            raise NotFound(f"{path} has no config.json: not a Hugging Face model folder")
        return path
    first = path.split("/")[0]
    local = os.path.isdir(first) and first not in (".", "..", "")
    if os.path.exists(path) or path.startswith((".", "/", "~")) or path.count("/") != 1 or local:
        raise NotFound(f"{path!r} is not a model folder (no such directory"
                       + (f"; {first}/ is a local folder, so it is not a hub id" if local else "")
                       + "). Fix: check the path, or give a hub id of the form 'org/name'")
    from huggingface_hub import snapshot_download
    try:
        return snapshot_download(path, allow_patterns=["*.json", "*.safetensors", "*.jinja",
                                                       "original/tokenizer.model"])
    except Exception as e:
        raise NotFound(f"{path!r}: not a local folder, and the hub could not provide it "
                       f"({type(e).__name__}: {str(e)[:200]}). Fix: download it where a hub is reachable "
                       "and pass the folder") from None


def read_json(path, missing=None):
    """A JSON file as a dict, with an error that names the file; `missing` when the file does not exist (None: the
    FileNotFoundError is raised)."""
    if missing is not None and not os.path.exists(path):
        return missing
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise BadInput(f"{path} is not valid JSON ({e}). Fix: restore it from the model's source") from None


def read_config_json(path):
    """A folder's config.json as a dict."""
    hf = read_json(os.path.join(path, "config.json"))
    if not isinstance(hf, dict):
        raise BadInput(f"{os.path.join(path, 'config.json')} holds a JSON {type(hf).__name__}, not the object a "
                       "config.json is. Fix: restore it from the model's source")
    return hf


def rope_of(hf: dict):
    """(rope_theta, rope_scaling or None) of a config.json: transformers >= 5 may write both together as
    "rope_parameters"."""
    rp = dict(hf.get("rope_parameters") or {})
    theta = hf.get("rope_theta", rp.pop("rope_theta", 10000.0))
    return theta, hf.get("rope_scaling") or (rp if rp.get("rope_type", "default") != "default" else None)


def safetensors_files(path):
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(index):
        try:
            with open(index) as f:
                files = sorted(set(json.load(f)["weight_map"].values()))
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise BadInput(f"{index} is not a safetensors index (a JSON object whose weight_map names the shards: "
                           f"{type(e).__name__} {e}). Fix: copy it again from where the model came from") from None
        gone = [f for f in files if not os.path.exists(os.path.join(path, f))]
        if gone:
            raise NotFound(f"{index} names shards that are not in {path}: {gone}. Fix: copy them there")
        return files
    if os.path.exists(os.path.join(path, "model.safetensors")):
        return ["model.safetensors"]
    raise NotFound(f"{path} has no model.safetensors or model.safetensors.index.json "
                   "(only safetensors are read, never pickled .bin files)")


# A safetensors header has names, dtypes, shapes and offsets but no checksum: a byte flipped inside a tensor (a bad
# disk, an interrupted copy) loads without a word. Every safetensors file this project writes therefore carries a
# CRC-32 of each tensor's bytes in its header metadata, and every read of such a file checks them (2 GB/s here:
# seconds for a 1B model). Files from elsewhere (hub downloads) have none and are read as they are.
CRC_KEY = "nanomla_crc32"


def tensor_crc(t) -> str:
    import torch
    return f"{zlib.crc32(t.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy()):08x}"


def save_tensors(tensors: dict, path, metadata=None):
    """safetensors.torch.save_file with the CRC-32 of every tensor in the header metadata."""
    from safetensors.torch import save_file
    save_file(tensors, path, metadata={**(metadata or {}),
                                       CRC_KEY: json.dumps({k: tensor_crc(v) for k, v in tensors.items()})})


def file_crcs(handle) -> dict:
    """{tensor name: CRC-32} an open safetensors file (safe_open) carries; {} for a file that has none."""
    try:
        crcs = json.loads((handle.metadata() or {}).get(CRC_KEY, "{}"))
    except ValueError:
        crcs = None
    if not isinstance(crcs, dict):
        raise BadInput(f"the {CRC_KEY} entry of a safetensors header is not a JSON object: the file is damaged. "
                       "Fix: copy it again from where it came from")
    return crcs


def check_crc(t, name, crcs, file):
    """Raise where tensor `name` (as read from `file`) differs from the CRC-32 written when the file was saved."""
    if name in crcs and tensor_crc(t) != crcs[name]:
        raise BadInput(f"{file}: the bytes of tensor {name} differ from the checksum written when it was saved: the "
                       "file was damaged after it was written (disk, copy or transfer). Fix: copy it again from "
                       "where it came from (a training checkpoint: resume falls back to the one before it)")


def load_tensors(file, device="cpu") -> dict:
    """safetensors.torch.load_file, each tensor checked against the CRC-32 in the header where the file has them."""
    from safetensors import safe_open
    with safe_open(file, framework="pt", device=str(device)) as f:
        crcs = file_crcs(f)
        out = {}
        for name in f.keys():
            out[name] = f.get_tensor(name)
            check_crc(out[name], name, crcs, file)
    return out


def run_child(args, **kw):
    """subprocess.run(args, **kw) for a script that launches training runs: the child gets its own process group, and
    a SIGTERM or SIGINT to this script is passed on to that whole group (torchrun and its workers), which then stops
    as a run stops (a last checkpoint, the lock released); this script waits for it and exits. Without it, killing
    the script would leave its child training, holding the run's lock."""
    got, proc = [], None

    def forward(signum, frame):
        got.append(signum)
        if proc is not None:  # a signal before the child exists: none is started (checked below)
            try:
                os.killpg(proc.pid, signum)
            except ProcessLookupError:
                pass

    old = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        proc = subprocess.Popen(args, start_new_session=True, **kw)
        if got:
            os.killpg(proc.pid, got[0])
        out, err = proc.communicate()
    finally:
        for s, h in old.items():
            signal.signal(s, h)
    if got:
        what = " ".join(a for a in args if a.endswith(".py") or a.startswith("--out"))
        raise SystemExit(f"stopped by {signal.Signals(got[0]).name}: the child run ({what}) was stopped too "
                         f"(exit {proc.returncode})")
    return subprocess.CompletedProcess(args, proc.returncode, out, err)


# -----------------------------------------------------------------------------
# Writing a model folder: atomically, recording what was written


def write_failed(e):
    """A failed write as one clear error: disks fill up (OSError), and safetensors reports the same as its own
    SafetensorError. Anything else is a bug and keeps its traceback."""
    try:
        from safetensors import SafetensorError
    except ImportError:
        SafetensorError = OSError
    return isinstance(e, (OSError, SafetensorError))


def check_replaceable(path):
    """Raise unless `path` is absent, an empty folder, or a folder write_folder wrote holding only its files. The
    verdict on a folder the project did not write comes from its top level alone (`/` is refused at once)."""
    if not os.path.lexists(path):
        return
    if os.path.islink(path) or not os.path.isdir(path):
        what = "a symbolic link" if os.path.islink(path) else "not a folder"
        raise Occupied(f"{path} exists and is {what}: refusing to replace it. Fix: choose another out_dir")
    top = os.listdir(path)
    if not top:
        return
    marker = os.path.join(path, WRITTEN_BY)
    ours = set()
    if WRITTEN_BY in top and os.path.isfile(marker) and not os.path.islink(marker):
        try:
            with open(marker) as f:
                ours = set(json.load(f).get("files", [])) | {WRITTEN_BY}
        except (json.JSONDecodeError, AttributeError, UnicodeDecodeError):
            ours = set()
    if not ours:
        raise Occupied(f"{path} was not written by this project ({_show(top)}): refusing to replace it, "
                       "nothing was changed. Fix: choose a new or empty folder as out_dir")
    foreign = []
    for r, dirs, files in os.walk(path):  # our own folder: small, and os.walk does not follow links
        for n in dirs + files:
            p = os.path.join(r, n)
            rel = os.path.relpath(p, path)
            if os.path.islink(p) or (n in files and rel not in ours) or (n in dirs and not os.listdir(p)):
                foreign.append(rel + ("/" if n in dirs else ""))
    if foreign:
        raise Occupied(f"{path} holds files this project did not write ({_show(foreign)}): refusing to "
                       "replace it, nothing was changed. Fix: choose a new or empty folder as out_dir, or move "
                       "those files away yourself")


def write_folder(path, fill, what="write_folder"):
    """Write a folder atomically: fill(tmp) writes the files into a temporary folder beside `path`, which then
    replaces `path` (checked with check_replaceable before and after). The old folder is removed only once the new
    one is complete; a failure leaves `path` as it was and no temporary folder behind."""
    path = os.path.abspath(os.path.expanduser(str(path)))
    check_replaceable(path)
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=os.path.basename(path) + ".tmp-", dir=parent)
    try:
        try:
            fill(tmp)
        except Exception as e:
            if not write_failed(e):
                raise
            raise CannotWrite(f"writing {path} failed ({type(e).__name__}: {e}); nothing was replaced. Fix: free disk "
                              "space (or check the folder's permissions), then run again") from None
        written = sorted(os.path.relpath(os.path.join(r, f), tmp) for r, _, fs in os.walk(tmp) for f in fs)
        write_json(os.path.join(tmp, WRITTEN_BY), {"written_by": f"{PROJECT} ({what})", "files": written})
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; a model folder is as readable as any other
        for r, dirs, fs in os.walk(tmp):
            for dname in dirs:
                os.chmod(os.path.join(r, dname), 0o755)
            for f in fs:
                os.chmod(os.path.join(r, f), 0o644)
        check_replaceable(path)  # again: something may have appeared there while the files were written
        old = None
        if os.path.exists(path):
            old = tempfile.mkdtemp(prefix=os.path.basename(path) + ".old-", dir=parent)
            os.replace(path, os.path.join(old, "x"))
        try:
            os.replace(tmp, path)
        except BaseException:
            if old:  # put the earlier folder back where it was: a failed write never leaves `path` missing
                os.replace(os.path.join(old, "x"), path)
                os.rmdir(old)
            raise
        if old:
            shutil.rmtree(old)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


# -----------------------------------------------------------------------------
# Outputs apart from inputs


def _real(p):
    return os.path.realpath(os.path.abspath(os.path.expanduser(str(p))))


def check_apart(out, out_name, inputs, outputs=None):
    """Refuse before any work an output path that is, contains or lies inside one of `inputs` ({name: path}; paths
    that do not exist, hub ids and empty names are skipped) or one of the other `outputs` (whether they exist yet or
    not): a conversion writing over its source, a run moving its own input aside, a cache inside a model folder."""
    o = _real(out)
    pairs = [(n, p, False) for n, p in inputs.items()] + [(n, p, True) for n, p in (outputs or {}).items()]
    for name, p, is_output in pairs:
        if not p or not (is_output or os.path.exists(os.path.expanduser(str(p)))):
            continue
        i = _real(p)
        rel = "is" if o == i else "lies inside" if o.startswith(i.rstrip(os.sep) + os.sep) else \
            "contains" if i.startswith(o.rstrip(os.sep) + os.sep) else None
        if rel:
            kind = "the other output" if is_output else "the input"
            raise BadInput(f"{out_name}={out} {rel} {kind} {name}={p}: writing there would replace, move or mix "
                           f"into it. Fix: give {out_name} a folder apart from every input and output")


# -----------------------------------------------------------------------------
# A training run's out_dir: the names a run owns, its checkpoints, its lock

CKPT = re.compile(r"ckpt-(\d{7})")


def run_names(log_name):
    """Regular expressions of what a `log_name` run writes in its out_dir (folders end in '/')."""
    return [r"ckpt-\d{7}/", r"ckpt-\d{7}\.(tmp|old)/", r"final/", r"final\.(tmp|old)-[A-Za-z0-9_]+/",
            r"replaced-\d{8}-\d{6}(-\d+)?/", r"ref_logps-[0-9a-f]{12}\.safetensors(\.tmp)?", r"\.lock",
            re.escape(log_name) + r"\.txt", re.escape(log_name) + r"\.jsonl"]


def run_owned(out_dir, name, log_name):
    """Whether out_dir/name is something a `log_name` run writes: its name and kind, never a link."""
    p = os.path.join(out_dir, name)
    if os.path.islink(p):
        return False
    shown = name + ("/" if os.path.isdir(p) else "")
    return any(re.fullmatch(rx, shown) for rx in run_names(log_name))


def checkpoints(out_dir):
    """The COMPLETE checkpoints in out_dir (renamed into place, meta.json present), oldest first, by step number."""
    if not os.path.isdir(out_dir):
        return []
    found = [(int(m.group(1)), n) for n in os.listdir(out_dir) if (m := CKPT.fullmatch(n))
             and not os.path.islink(os.path.join(out_dir, n)) and os.path.isfile(os.path.join(out_dir, n, "meta.json"))]
    return [os.path.join(out_dir, n) for _, n in sorted(found)]


def latest_checkpoint(out_dir):
    """The newest complete checkpoint, or None."""
    done = checkpoints(out_dir)
    return done[-1] if done else None


def claim_out_dir(out_dir, resume, log_name, need_bytes=0):
    """The file-system half of trainer.prepare_out_dir (rank 0 only): refuse an out_dir holding anything a run
    does not write, take its lock, check the disk, and on a fresh start move an earlier run's files aside to
    replaced-<time>/. Returns whether to resume."""
    if resume not in (True, False, "auto"):
        raise BadInput(f"resume={resume!r}: use True, False or 'auto' (resume when a checkpoint exists)")
    out_dir = os.path.abspath(os.path.expanduser(out_dir))
    if os.path.lexists(out_dir) and not os.path.isdir(out_dir):
        raise Occupied(f"out_dir {out_dir} is a file. Fix: choose a folder")
    present = os.listdir(out_dir) if os.path.isdir(out_dir) else []
    foreign = [n for n in present if not run_owned(out_dir, n, log_name)]
    if foreign:
        raise Occupied(f"out_dir {out_dir} holds files a {log_name} run does not write ({_show(foreign)}): "
                       "refusing to use it, nothing was changed. Fix: give a new or empty folder as out_dir")
    os.makedirs(out_dir, exist_ok=True)
    take_lock(out_dir)
    free = shutil.disk_usage(out_dir).free
    if need_bytes > free:
        release_lock(out_dir)
        raise CannotWrite(f"out_dir {out_dir}: {free / 2**30:.2f} GiB free, but the run's checkpoints and export "
                          f"need about {need_bytes / 2**30:.2f} GiB. Fix: free space, lower keep_ckpts, or pick "
                          "another disk")
    has_ckpt = latest_checkpoint(out_dir) is not None
    if resume is True and not has_ckpt:
        release_lock(out_dir)
        raise NotFound(f"resume=True but {out_dir} holds no complete checkpoint. Fix: drop --resume to "
                       "start a fresh run, or use --resume=auto (resume when there is one)")
    go_on = resume is True or (resume == "auto" and has_ckpt)
    old = [n for n in present if not n.startswith(("replaced-", ".lock"))]
    if not go_on and old:
        stamp = os.path.join(out_dir, "replaced-" + time.strftime("%Y%m%d-%H%M%S"))
        dest, k = stamp, 0
        while os.path.lexists(dest):  # two fresh starts in one second: never merge into an earlier one
            k += 1
            dest = f"{stamp}-{k}"
        os.makedirs(dest)
        for n in old:
            os.replace(os.path.join(out_dir, n), os.path.join(dest, n))
        print(f"{out_dir} held an earlier run: moved {_show(old, 10)} to {dest} (use --resume=True to continue a run "
              "instead)", flush=True)
    return go_on


def take_lock(out_dir):
    path = os.path.join(out_dir, ".lock")
    me = f"{os.getpid()}@{socket.gethostname()}"
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            with os.fdopen(fd, "w") as f:
                f.write(me + "\n")
            at_exit(release_lock, out_dir, me)
            return
        except FileExistsError:
            owner, alive = lock_holder(path)
            if alive:
                raise Busy(f"out_dir {out_dir} is in use by another run (process {owner}, lock {path}). "
                           "Fix: wait for it, or give another out_dir. If that run is dead on another "
                           "machine, delete the lock file") from None
            os.remove(path)  # stale: its process is gone
    raise RuntimeError(f"could not take the lock {path}")


def lock_holder(path):
    """(who holds the lock file at `path`, whether that run may be alive). Another machine's lock cannot be checked,
    so it counts as alive. An empty lock is one a run is writing this instant, or one left by a crash between
    creating and writing it: alive only while it is new (10 s)."""
    try:
        owner = open(path).read().strip()
        age = time.time() - os.path.getmtime(path)
    except OSError:
        return "", False
    if not owner:
        return "(empty)", age < 10
    pid, _, host = owner.partition("@")
    if host != socket.gethostname() or not pid.isdigit():
        return owner, True
    try:
        os.kill(int(pid), 0)
        return owner, True
    except ProcessLookupError:
        return owner, False
    except PermissionError:
        return owner, True


def check_not_in_a_live_run(path):
    """Raise if `path` lies in the out_dir of a training run that holds its lock (svd_init.py, export.py or
    zebra.py told to write OUT/final while distill.py is writing it)."""
    d = os.path.dirname(os.path.abspath(os.path.expanduser(path)))
    lock = os.path.join(d, ".lock")
    if os.path.exists(lock):
        owner, alive = lock_holder(lock)
        if alive and owner.partition("@")[0] != str(os.getpid()):
            raise Busy(f"{path} is inside {d}, which a training run is using (process {owner}, lock {lock}): "
                       "it would write there too. Fix: choose an out_dir outside it, or wait for that run")


def release_lock(out_dir, me=None):
    path = os.path.join(out_dir, ".lock")
    try:
        if me is None or open(path).read().strip() == me:
            os.remove(path)
    except OSError:
        pass


# -----------------------------------------------------------------------------
# A results file: replaced only when this project wrote it


def check_results_file(path):
    """Raise unless `path` is absent or a JSON file this project wrote (write_results_file's "written_by"), and unless
    its folder can be written (read-only, full or not a folder: refused now, not after the work it would record)."""
    check_writable(path)
    if not os.path.lexists(path):
        return
    if os.path.islink(path) or not os.path.isfile(path):
        raise Occupied(f"{path} exists and is not a plain file: refusing to replace it. Fix: choose another "
                       "--out")
    try:
        with open(path) as f:
            obj = json.load(f)
        # files from before "written_by" existed: evaluate.py's own shape
        ours = str(obj.get("written_by", "")).startswith(PROJECT) or {"config", "harness", "tasks"} <= set(obj)
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError, OSError):
        ours = False
    if not ours:
        raise Occupied(f"{path} exists and is not a results file this project wrote: refusing to replace it, "
                       "nothing was changed. Fix: choose another --out, or move that file away yourself")


def check_writable(path):
    """Raise unless a new file `path` can be written: create and remove one temporary file of ours in its folder (or
    the nearest existing ancestor, where the missing folders would be made), the only sure test of a read-only
    mount, a full disk or a path through a file."""
    probe = os.path.dirname(os.path.abspath(os.path.expanduser(str(path))))
    while not os.path.exists(probe) and os.path.dirname(probe) != probe:
        probe = os.path.dirname(probe)
    try:
        fd, tmp = tempfile.mkstemp(prefix=".nanomla-write-test-", dir=probe)
        try:
            os.write(fd, bytes(4096))  # a block: an empty file can still be made on a full disk
            os.fsync(fd)
        finally:
            os.close(fd)
            os.remove(tmp)
    except OSError as e:
        raise CannotWrite(f"{path} cannot be written ({probe}: {e.strerror or e}). Fix: a path on a writable disk with "
                          "free space") from None


def write_results_file(path, obj, what):
    """Valid JSON (NaN / inf become null) with a "written_by" key, written atomically through a uniquely named
    temporary file beside it: a crash mid-write never leaves half a file, and no other file is touched."""
    path = os.path.abspath(os.path.expanduser(str(path)))
    check_results_file(path)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=os.path.basename(path) + ".tmp-", dir=os.path.dirname(path))
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(_finite({"written_by": f"{PROJECT} ({what})", **obj}), f, indent=2, allow_nan=False)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def _finite(x):
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_finite(v) for v in x]
    return x


def check_rows_file(path, keys):
    """An append-only JSON-lines results file (scripts/): absent, or every line a JSON object holding `keys` (rows
    the same script wrote before). Anything else is refused before any work: appending would corrupt it; so is a
    path whose folder cannot be written."""
    check_writable(path)
    if not os.path.lexists(path):
        return
    try:
        with open(path) as f:
            rows = [json.loads(line) for line in f if line.strip()]
        ok = not os.path.islink(path) and all(isinstance(r, dict) and set(keys) <= set(r) for r in rows)
    except (json.JSONDecodeError, UnicodeDecodeError, IsADirectoryError):
        ok = False
    if not ok:
        raise Occupied(f"{path} exists and is not a rows file this script wrote: refusing to append to it. "
                       "Fix: give another path, or move that file away yourself")


def check_only(folder, allowed, what):
    """Raise unless `folder` is absent or holds nothing but the names in `allowed` (regular expressions; folders
    end in '/'), none of them a link: for scripts that lay out several runs under one root."""
    if not os.path.lexists(folder):
        return
    if os.path.islink(folder) or not os.path.isdir(folder):
        raise Occupied(f"{what} {folder} is not a folder: refusing to use it. Fix: choose another path")
    foreign = [n for n in os.listdir(folder) if os.path.islink(os.path.join(folder, n)) or not any(
        re.fullmatch(rx, n + ("/" if os.path.isdir(os.path.join(folder, n)) else "")) for rx in allowed)]
    if foreign:
        raise Occupied(f"{what} {folder} holds files this script does not write ({_show(foreign)}): refusing "
                       "to use it, nothing was changed. Fix: give a new or empty folder")
