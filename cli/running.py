"""What every command that samples does around its run: SIGTERM as Ctrl-C, the size of the plan, the
progress bar. Command modules import this (never ``cli/main.py``, which only assembles the app)."""

from __future__ import annotations

import signal

import typer

from .output import human_bytes


def sigterm_as_interrupt() -> None:
    """A killed run (SIGTERM) closes its store as cleanly as Ctrl-C does."""
    def handler(signum, frame):
        raise KeyboardInterrupt
    try:
        signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not in the main thread (e.g. inside a test runner thread)
        pass


def announce_plan(session, quiet: bool) -> None:
    """Say how much the capture will write before it starts; call out N x N pattern arrays."""
    from dithooks.capture import PATTERN_DIMS

    plan = session.planned_arrays()
    if quiet or not plan:
        return
    total = sum(p.nbytes for p in plan)
    typer.echo(f"will write {human_bytes(total)} of hook values ({len(plan)} arrays) before compression", err=True)
    for p in plan:
        if all(d in p.dims for d in PATTERN_DIMS):
            typer.echo(f"  {p.name}: full attention patterns {'x'.join(map(str, p.shape))} = {human_bytes(p.nbytes)}"
                       " (reductions attn.n_eff, attn.entropy, attn.pattern_headmean, attn.pattern_query, "
                       "attn.topk_* are far smaller)", err=True)


def run_with_progress(session, steps: int, desc: str, quiet: bool):
    """Run a capture session under SIGTERM-as-interrupt with the plan announced and a progress bar."""
    from tqdm.auto import tqdm

    from .run_options import run_session

    sigterm_as_interrupt()

    def progress(it):  # called once sampling starts: the store is open, so the plan is news
        announce_plan(session, quiet=quiet)
        return tqdm(it, total=steps, initial=it.start, desc=desc, unit="step", disable=quiet)

    return run_session(session, progress)
