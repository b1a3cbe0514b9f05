"""Fault injection: SIGKILL a real `dithooks capture` at chosen store operations, then recover.

One driver process (this module run as ``python -m tests.test_fault_injection``) imports the
CLI, warms it up, and then forks one child per fault: the child runs ``dithooks capture`` (the
real CLI entry point, in-process) with every store operation counted - each file written by Zarr
(``put``) and the rename that makes it visible (``replace``), each rename, link, unlink, mkdir and
rmtree under the test folder - and SIGKILLs itself at the k-th one, so no cleanup code runs. A
second child then runs what a user would: ``dithooks ls``, ``--resume``, and ``--overwrite`` if
the resume is refused. Counting runs (no kill) first tell how many operations each scenario does
and which belong to store creation, the steps, and finalisation; the kill points are drawn from
them with a fixed seed, so every run of the test injects the same faults.

Scenarios: a new store (12 kills: >= 3 during creation, >= 3 during finalisation), ``--overwrite``
of a complete store (4), ``--resume`` of an interrupted one (4); plus a concurrent writer (a
capture stopped while it holds the lock: a second ``--overwrite`` and ``--resume`` are refused in
one line; after a SIGKILL of the first, ``--resume`` finishes the store).

The test asserts for every kill: ``ls`` prints one line or succeeds, never a traceback; the store
is resumable, or the resume is refused in one line and ``--overwrite`` works; the result equals an
unbroken run bit for bit and ``dithooks verify`` finds it whole. Stores are written one step per
write (``BATCH_STEPS = 1``, as a large model writes) so that kills fall between steps.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path

import numpy as np

SEED = 9
PLAN = {"create": 12, "overwrite": 4, "resume": 4}
ARGS = ["capture", "--sampler", "ddpm", "--steps", "4", "--seeds", "0-1", "--class", "3", "--layers", "0-2",
        "--hooks", "resid_post,final.out", "--dtype", "fp32", "-q"]
REPO = Path(__file__).resolve().parents[1]


# -- the driver (runs in its own process) -------------------------------------------------------
class Ops:
    """Store operations under ``root``: counted; the child kills (or stops) itself at one."""

    root = ""
    n = 0
    kill_at: int | None = None
    stop_at: int | None = None
    log: list | None = None
    guard = threading.Lock()


def _op(kind: str, path) -> None:
    p = os.fspath(path) if not isinstance(path, int) else ""
    if not Ops.root or not str(p).startswith(Ops.root):
        return
    with Ops.guard:
        Ops.n += 1
        n = Ops.n
        if Ops.log is not None:
            Ops.log.append((kind, os.path.relpath(p, Ops.root)))
    if n == Ops.kill_at:
        os.kill(os.getpid(), signal.SIGKILL)
    if n == Ops.stop_at:
        os.kill(os.getpid(), signal.SIGSTOP)


def _install_counters() -> None:
    import zarr.storage._local as zl

    real_put = zl._put

    def put(path, value, exclusive=False):
        _op("put", path)
        return real_put(path, value, exclusive)

    zl._put = put
    for name in ("rename", "replace", "link"):
        real = getattr(os, name)

        def wrapped(src, dst, *a, _real=real, _name=name, **kw):
            _op(_name, dst)
            return _real(src, dst, *a, **kw)

        setattr(os, name, wrapped)
    for name in ("unlink", "remove", "mkdir", "rmdir"):
        real = getattr(os, name)

        def wrapped1(path, *a, _real=real, _name=name, **kw):
            # a mkdir of a folder that exists changes nothing (Zarr makes parents before each write)
            if kw.get("dir_fd") is None and not (_name == "mkdir" and os.path.isdir(path)):
                _op(_name, path)
            return _real(path, *a, **kw)

        setattr(os, name, wrapped1)
    real_rmtree = shutil.rmtree

    def rmtree(path, *a, **kw):
        _op("rmtree", path)
        return real_rmtree(path, *a, **kw)

    shutil.rmtree = rmtree


def _call_app(args: list[str], prefix: Path) -> dict:
    """Run the dithooks CLI in this process with stdout/stderr in files; its exit code and text."""
    from dithooks.cli.main import app

    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    out = os.open(f"{prefix}.out", os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    err = os.open(f"{prefix}.err", os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    os.dup2(out, 1)
    os.dup2(err, 2)
    try:
        try:
            app(args, prog_name="dithooks")
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        except BaseException:
            traceback.print_exc()
            code = 99
        sys.stdout.flush()
        sys.stderr.flush()
    finally:
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in (out, err, *saved):
            os.close(fd)
    return {"rc": code, "stderr": Path(f"{prefix}.err").read_text(), "stdout": Path(f"{prefix}.out").read_text()}


def _fork(fn) -> tuple[int, int]:
    """Run ``fn()`` in a child; returns (pid, wait status)."""
    pid = os.fork()
    if pid == 0:
        code = 97
        try:
            code = fn() or 0
        except BaseException:
            traceback.print_exc()
        os._exit(code)
    return pid, os.waitpid(pid, 0)[1]


def _run_killed(args: list[str], prefix: Path, kill_at: int | None, log_file: Path | None = None) -> dict:
    def child():
        Ops.n, Ops.kill_at, Ops.stop_at = 0, kill_at, None
        Ops.log = [] if log_file is not None else None
        r = _call_app(args, prefix)
        if log_file is not None:
            log_file.write_text(json.dumps(Ops.log))
        return r["rc"]

    _, status = _fork(child)
    killed = os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
    return {"killed": killed, "rc": None if killed else os.waitstatus_to_exitcode(status)}


def _recover(store: Path, prefix: Path) -> dict:
    """What a user does next: ls, --resume, and --overwrite when the resume is refused."""
    result_file = Path(f"{prefix}.recover.json")

    def child():
        Ops.n, Ops.kill_at, Ops.stop_at, Ops.log = 0, None, None, None
        out = {"ls": _call_app(["ls", str(store)], Path(f"{prefix}.ls"))}
        out["resume"] = _call_app(ARGS + ["--out", str(store), "--resume"], Path(f"{prefix}.resume"))
        out["overwrite"] = None
        if out["resume"]["rc"] != 0:
            out["overwrite"] = _call_app(ARGS + ["--out", str(store), "--overwrite"], Path(f"{prefix}.overwrite"))
        result_file.write_text(json.dumps(out))
        return 0

    _fork(child)
    return json.loads(result_file.read_text())


def _phases(log: list, target: str) -> list[str]:
    """Label each operation: create (building the store, renaming it in), replace (the old store
    moved aside and deleted), steps, finish (after the last step is marked complete)."""
    last_mark = max((i for i, (_, p) in enumerate(log) if "step_complete/c/" in p), default=len(log))
    placed = next((i for i, (k, p) in enumerate(log) if k == "rename" and os.path.basename(p) == target), -1)
    out = []
    for i, (kind, p) in enumerate(log):
        if "dithooks-old" in p:
            out.append("replace")
        elif i <= placed or "dithooks-new" in p:
            out.append("create")
        elif i > last_mark:
            out.append("finish")
        else:
            out.append("steps")
    return out


def _choose(rng: random.Random, phases: list[str], count: int, want: dict[str, int]) -> list[int]:
    """``count`` distinct 1-based operation numbers, at least ``want[phase]`` from each phase."""
    chosen: set[int] = set()
    for phase, k in want.items():
        pool = [i + 1 for i, p in enumerate(phases) if p == phase]
        chosen.update(rng.sample(pool, min(k, len(pool))))
    rest = [i for i in range(1, len(phases) + 1) if i not in chosen]
    chosen.update(rng.sample(rest, min(count - len(chosen), len(rest))))
    return sorted(chosen)


def drive(root: Path, seed: int = SEED, plan: dict | None = None, every: bool = False) -> dict:
    """Run all scenarios under ``root``; returns (and writes to root/results.json) the records.
    ``every``: kill at every operation instead of the drawn ones (slow: ~650 kills); a ``plan``
    entry of 0 skips that scenario."""
    import torch

    torch.set_num_threads(1)
    import dithooks.capture.recorder as recorder_mod
    import dithooks.capture.session as capture_mod
    from dithooks.loading import load_model

    plan = plan or PLAN
    cache = {}

    def cached_load(*a, **kw):  # children inherit the loaded model: no weights read per fault
        key = repr((a, sorted(kw.items())))
        if key not in cache:
            cache[key] = load_model(*a, **kw)
        return cache[key]

    capture_mod.load_model = cached_load
    recorder_mod.BATCH_STEPS = 1
    warm = root / "warm"
    warm.mkdir()
    assert _call_app(ARGS + ["--out", str(warm / "w.zarr")], warm / "w")["rc"] == 0  # imports, model
    _install_counters()
    Ops.root = str(root)
    rng = random.Random(seed)
    records: list[dict] = []
    t0 = time.time()

    # the unbroken run, counted: the reference store and the operations of a new store
    ref = root / "ref" / "s.zarr"
    ref.parent.mkdir()
    log_file = root / "ref" / "ops.json"
    r = _run_killed(ARGS + ["--out", str(ref)], root / "ref" / "run", None, log_file)
    assert r["rc"] == 0, (root / "ref" / "run.err").read_text()
    create_log = json.loads(log_file.read_text())
    create_phases = _phases(create_log, "s.zarr")

    def scenario(name: str, points: list[int], phases: list[str], log: list, prepare, args_tail: list[str]):
        for k in points:
            d = root / f"{name}-{k}"
            d.mkdir()
            store = d / "s.zarr"
            prepare(store)
            run = _run_killed(ARGS + ["--out", str(store)] + args_tail, d / "run", k)
            rec = {"scenario": name, "op": k, "of": len(log), "phase": phases[k - 1], "what": log[k - 1],
                   "killed": run["killed"], "rc": run["rc"], "store": str(store)}
            rec.update(_recover(store, d / "rec"))
            rec["outcome"] = "resumed" if rec["resume"]["rc"] == 0 else \
                "refused, overwritten" if rec["overwrite"] and rec["overwrite"]["rc"] == 0 else "unrecoverable"
            records.append(rec)

    # 1. a new store
    n = plan["create"]
    pts = list(range(1, len(create_log) + 1)) if every else \
        _choose(rng, create_phases, n, {"create": max(3, n // 4), "finish": max(3, n // 4)})
    scenario("create", pts if n else [], create_phases, create_log, lambda s: None, [])

    # 2. --overwrite of a complete store
    def copy_ref(store):
        shutil.copytree(ref, store)

    d = root / "overwrite-count"
    d.mkdir()
    copy_ref(d / "s.zarr")
    r = _run_killed(ARGS + ["--out", str(d / "s.zarr"), "--overwrite"], d / "run", None, d / "ops.json")
    assert r["rc"] == 0, (d / "run.err").read_text()
    ow_log = json.loads((d / "ops.json").read_text())
    ow_phases = _phases(ow_log, "s.zarr")
    pts = list(range(1, len(ow_log) + 1)) if every else \
        _choose(rng, ow_phases, plan["overwrite"], {"create": 1, "replace": 1})
    scenario("overwrite", pts if plan["overwrite"] else [], ow_phases, ow_log, copy_ref, ["--overwrite"])

    # 3. --resume of an interrupted store (killed after its second step was marked)
    partial = root / "partial" / "s.zarr"
    partial.parent.mkdir()
    marks = [i + 1 for i, (_, p) in enumerate(create_log) if "step_complete/c/" in p]
    r = _run_killed(ARGS + ["--out", str(partial)], root / "partial" / "run", marks[1] + 1)
    assert r["killed"]

    def copy_partial(store):
        shutil.copytree(partial, store)

    d = root / "resume-count"
    d.mkdir()
    copy_partial(d / "s.zarr")
    r = _run_killed(ARGS + ["--out", str(d / "s.zarr"), "--resume"], d / "run", None, d / "ops.json")
    assert r["rc"] == 0, (d / "run.err").read_text()
    rs_log = json.loads((d / "ops.json").read_text())
    rs_phases = _phases(rs_log, "s.zarr")
    pts = list(range(1, len(rs_log) + 1)) if every else _choose(rng, rs_phases, plan["resume"], {"finish": 1})
    scenario("resume", pts if plan["resume"] else [], rs_phases, rs_log, copy_partial, ["--resume"])

    # 4. a concurrent writer: stopped while it holds the lock (mid-steps)
    d = root / "concurrent"
    d.mkdir()
    store = d / "s.zarr"
    mid = next(i + 1 for i, p in enumerate(create_phases) if p == "steps")

    def writer():
        Ops.n, Ops.kill_at, Ops.stop_at, Ops.log = 0, None, mid, None
        return _call_app(ARGS + ["--out", str(store)], d / "a")["rc"]

    pid = os.fork()
    if pid == 0:
        code = 97
        try:
            code = writer()
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, os.WUNTRACED)
    conc = {"stopped": os.WIFSTOPPED(status), "writer_pid": pid}
    conc["second_overwrite"] = _call_in_child(ARGS + ["--out", str(store), "--overwrite"], d / "b")
    conc["second_resume"] = _call_in_child(ARGS + ["--out", str(store), "--resume"], d / "c")
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    conc["resume_after_kill"] = _call_in_child(ARGS + ["--out", str(store), "--resume"], d / "d")
    conc["store"] = str(store)

    out = {"reference": str(ref), "records": records, "concurrent": conc, "seconds": round(time.time() - t0, 1),
           "ops": {"create": len(create_log), "overwrite": len(ow_log), "resume": len(rs_log)}}
    (root / "results.json").write_text(json.dumps(out, indent=1))
    return out


def _call_in_child(args: list[str], prefix: Path) -> dict:
    res = Path(f"{prefix}.json")

    def child():
        Ops.n, Ops.kill_at, Ops.stop_at, Ops.log = 0, None, None, None
        res.write_text(json.dumps(_call_app(args, prefix)))
        return 0

    _fork(child)
    return json.loads(res.read_text())


# -- the test ------------------------------------------------------------------------------------
def _arrays(path: str) -> dict[str, np.ndarray]:
    import warnings

    import zarr

    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*not recognized")  # a file Zarr does not know, left over
        g = zarr.open_group(path, mode="r", use_consolidated=False)
        return {k: np.asarray(g[k][...]) for k in g.array_keys()}


def assert_bitwise_equal(a: str, b: str) -> None:
    A, B = _arrays(a), _arrays(b)
    assert sorted(A) == sorted(B)
    for k in A:
        x, y = A[k], B[k]
        assert x.dtype == y.dtype and x.shape == y.shape, k
        if x.dtype.kind in "fiub":
            assert x.tobytes() == y.tobytes(), k
        else:
            assert x.tolist() == y.tolist(), k


def one_line(text: str) -> bool:
    lines = [ln for ln in text.splitlines() if ln.strip()]
    return len(lines) == 1 and "Traceback" not in text


def test_killed_captures_resume_bit_for_bit_or_are_refused_in_one_line(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    r = subprocess.run([sys.executable, "-m", "tests.test_fault_injection", str(tmp_path)], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-4000:]
    res = json.loads((tmp_path / "results.json").read_text())
    recs = res["records"]
    assert len(recs) == sum(PLAN.values())
    phases = [x["phase"] for x in recs]
    assert phases.count("create") >= 3 and phases.count("finish") >= 3, phases
    from dithooks.store.verify import verify_store

    for rec in recs:
        where = f"{rec['scenario']} op {rec['op']} {rec['what']}"
        assert rec["killed"], where
        assert rec["ls"]["rc"] == 0 or one_line(rec["ls"]["stderr"]), (where, rec["ls"])
        assert "Traceback" not in rec["ls"]["stderr"] + rec["resume"]["stderr"], where
        if rec["resume"]["rc"] != 0:
            assert one_line(rec["resume"]["stderr"]), (where, rec["resume"])
            assert rec["overwrite"]["rc"] == 0, (where, rec["overwrite"])
        assert rec["outcome"] != "unrecoverable", where
        assert_bitwise_equal(res["reference"], rec["store"])  # (fails on files Zarr does not know, too)
        assert verify_store(rec["store"]).ok, where
        leftovers = [p.name for p in Path(rec["store"]).parent.iterdir() if "dithooks-" in p.name]
        assert not leftovers, (where, leftovers)
    c = res["concurrent"]
    assert c["stopped"]
    for key in ("second_overwrite", "second_resume"):
        assert c[key]["rc"] != 0 and one_line(c[key]["stderr"]), c[key]
        assert f"pid {c['writer_pid']}" in c[key]["stderr"], c[key]
    assert c["resume_after_kill"]["rc"] == 0, c["resume_after_kill"]
    assert_bitwise_equal(res["reference"], c["store"])
    counts = {}
    for rec in recs:
        counts[rec["outcome"]] = counts.get(rec["outcome"], 0) + 1
    print(f"\nfault injection: {len(recs)} kills, {counts}, phases "
          f"{ {p: phases.count(p) for p in set(phases)} }, ops {res['ops']}, {res['seconds']} s")


if __name__ == "__main__":
    # python -m tests.test_fault_injection ROOT [--every] [--only=create,overwrite,resume]
    only = next((a.split("=", 1)[1].split(",") for a in sys.argv if a.startswith("--only=")), list(PLAN))
    drive(Path(sys.argv[1]), every="--every" in sys.argv, plan={k: v if k in only else 0 for k, v in PLAN.items()})
