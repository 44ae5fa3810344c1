"""A run's state from its files: every stage verified against the plan and the run's current checkpoint.

The manifest records what was submitted and how each job said it ended; the files are what the run holds.
`--status`, `--wait`, the report's warnings and every launcher's exit code come from here: an item is `done`
only when its files exist, verify, and were made from the checkpoint the run holds now, whatever the
manifest says (a killed job, a full disk or a copied-in checkpoint leave the manifest behind).

  train       the manifest says training finished, and a checkpoint verifies (its sha256 sidecar)
  eval        eval.json was made from that checkpoint
  viz[k]      shard k is complete and this plan's (rundir.Plan.mismatch and its /index), and the plan was
              made from that checkpoint
  viz.h5      collated from exactly the shards that verify now
  project[i]  projection part i matches viz.h5's merged top-k lists (collation's digest)
  featviz[i]  feature visualization part i was made from the plan's checkpoint, featviz config and channels (its
              digest), and the plan from the run's checkpoint
  report      report.json was made from the inputs the run holds now (`report_inputs`), is complete, and
              every figure it lists is in report/figures/
"""
from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import store
from ..errors import InputError, JobError
from ..rundir import Plan, RunDir
from ..train import checkpoint
from .featviz_parts import featviz_states
from .plan import shard_problems, usable_shards
from .projection import part_states

__all__ = ["Item", "RunState", "run_state", "report_inputs", "check_outcome", "describe_problems", "StageFailed",
           "SCOPES"]

DONE = "done"


class StageFailed(JobError):
    """A stage of the run did not finish, or what it made is missing, stale or another run's."""
SCOPES = ("train", "viz", "report")  # the stages whose items a command promises: launch_train, launch_viz, ...


@dataclass
class Item:
    name: str                 # train | eval | viz[k] | viz.h5 | project[i] | featviz[i] | report
    state: str                # done | missing | stale | incomplete | failed | running | not run | ...
    detail: str = ""
    scope: str = "report"     # the stage (one of SCOPES) whose command makes it

    @property
    def ok(self) -> bool:
        return self.state == DONE


@dataclass
class RunState:
    items: list[Item] = field(default_factory=list)
    checkpoint_sha256: str | None = None   # of the checkpoint the run holds now (None: none verifies)
    plan: Plan | None = None

    def problems(self, stages: Sequence[str] = SCOPES) -> list[Item]:
        """The items of `stages` that are not done (every stage's: what the pipeline and the report promise)."""
        return [i for i in self.items if i.scope in stages and not i.ok]

    def complete(self, stages: Sequence[str] = SCOPES) -> bool:
        return not self.problems(stages)

    def item(self, name: str) -> Item | None:
        return next((i for i in self.items if i.name == name), None)


def _short(sha: str | None) -> str:
    return (sha or "none")[:12]


def _train_items(run: RunDir) -> tuple[list[Item], str | None]:
    rec = run.manifest().train
    try:
        found = checkpoint.find_checkpoint(run.checkpoints)
    except checkpoint.CheckpointError as e:
        return [Item("train", "failed", str(e).split(";")[0], "train")], None
    sha = checkpoint.sha256_file(found) if found is not None else None
    if found is None:
        train = Item("train", rec.status or "not run", rec.error or "no checkpoint yet", "train")
    elif rec.status != DONE:
        train = Item("train", rec.status or "not run", rec.error or f"last checkpoint {run.rel(found)}", "train")
    else:
        train = Item("train", DONE, f"{run.rel(found)} (sha256 {_short(sha)})", "train")
    ev = run.read_eval()
    if ev is None:
        evaluation = Item("eval", "missing", "no eval.json", "train")
    elif ev.get("checkpoint_sha256") != sha:
        evaluation = Item("eval", "stale", f"eval.json was made from checkpoint {_short(ev.get('checkpoint_sha256'))}, "
                          f"the run's is now {_short(sha)}", "train")
    else:
        evaluation = Item("eval", DONE, f"val accuracy {100 * ev.get('accuracy', float('nan')):.2f}%", "train")
    return [train, evaluation], sha


def _viz_items(run: RunDir, plan: Plan, sha: str | None) -> list[Item]:
    """One item per shard, then viz.h5 and the projection parts."""
    items = []
    stale = plan.checkpoint_sha256 != sha
    problems = shard_problems(run, plan)
    for k in range(len(plan.shards)):
        problem = problems.get(k)
        if problem:
            state = "missing" if problem.startswith("no such file") else "incomplete" if "incomplete" in problem \
                else "foreign" if problem.startswith("not this plan's") else "failed"
            items.append(Item(f"viz[{k}]", state, problem, "viz"))
        elif stale:
            items.append(Item(f"viz[{k}]", "stale", f"made from checkpoint {_short(plan.checkpoint_sha256)}, the "
                              f"run's is now {_short(sha)}", "viz"))
        else:
            items.append(Item(f"viz[{k}]", DONE, "verified", "viz"))
    good = [run.shard(k) for k in range(len(plan.shards)) if k not in problems]
    collated = _collation_item(run, plan, good)
    items.append(collated)
    if plan.topk:
        if not collated.ok:
            items.append(Item("project", "waiting", "the projections follow viz.h5's merged lists", "viz"))
        else:
            items += [Item(f"project[{i}]", state, detail, "viz") for i, state, detail in part_states(run, plan)]
    return items + _featviz_items(run, plan, stale)


def _featviz_items(run: RunDir, plan: Plan, stale: bool) -> list[Item]:
    """One item per feature visualization part: it needs the checkpoint only, not the shards or viz.h5."""
    try:
        states = featviz_states(run, plan)
    except (InputError, JobError) as e:  # no checkpoint to size the parts by
        return [Item("featviz", "failed", str(e).split(";")[0], "viz")] if plan.featviz_blocks else []
    if stale:
        return [Item(f"featviz[{i}]", "stale", f"the plan was made from checkpoint {_short(plan.checkpoint_sha256)}, "
                     "not the run's", "viz") for i, _, _ in states]
    return [Item(f"featviz[{i}]", state, detail, "viz") for i, state, detail in states]


def _collation_item(run: RunDir, plan: Plan, good: list) -> Item:
    if not good:
        return Item("viz.h5", "missing", "no shard of the plan verifies", "viz")
    if not run.viz_file.is_file():
        return Item("viz.h5", "missing", "not collated yet", "viz")
    try:
        attrs = store.read_attrs(run.viz_file)
    except store.StoreError as e:
        return Item("viz.h5", "failed", str(getattr(e, "problem", e)), "viz")
    if attrs.get("plan_checkpoint_sha256") != plan.checkpoint_sha256:
        return Item("viz.h5", "stale", "collated for another plan", "viz")
    now = shard_ids(run, good)
    then = dict(zip(attrs.get("shards") or [], attrs.get("shard_created") or []))
    if now != then:
        changed = sorted(set(now) ^ set(then) | {k for k in now if k in then and now[k] != then[k]})
        return Item("viz.h5", "stale", f"collated from other shards than those present now: {', '.join(changed[:4])}",
                    "viz")
    return Item("viz.h5", DONE, f"{attrs.get('n_images', '?')} images from {len(now)} shard(s)", "viz")


def shard_ids(run: RunDir, paths: list) -> dict[str, str]:
    """{shard name relative to viz/: its `created` attr}: which shards (not only which names) viz.h5 presents."""
    out = {}
    for p in paths:
        out[run.rel(p).removeprefix("viz/")] = str(store.read_attrs(p).get("created", ""))
    return out


def report_inputs(run: RunDir, plan: Plan | None, sha: str | None) -> dict[str, Any]:
    """What a report is made of: the checkpoint, eval.json's, the plan, each shard, projection part and
    feature visualization part (by identity, not by name). aggregate records it in report.json; the report is
    current while it holds."""
    ev = run.read_eval() or {}
    out: dict[str, Any] = {"checkpoint_sha256": sha, "eval_checkpoint_sha256": ev.get("checkpoint_sha256"),
                           "plan": None, "shards": {}, "parts": {}, "featviz": {}}
    if plan is not None:
        out["plan"] = hashlib.sha256(json.dumps(plan.to_dict(), sort_keys=True).encode()).hexdigest()
        good = [run.shard(k) for k in usable_shards(run, plan)]
        out["shards"] = shard_ids(run, good)
        for key, folder in (("parts", run.examples_dir), ("featviz", run.featviz_dir)):
            for p in sorted(folder.glob("part-*.h5")) if folder.is_dir() else []:
                try:
                    out[key][p.name] = str(store.read_attrs(p).get("digest", ""))
                except store.StoreError:
                    out[key][p.name] = ""
    return out


def _report_item(run: RunDir, plan: Plan | None, sha: str | None) -> Item:
    path = run.report_dir / "report.json"
    try:
        made = json.loads(path.read_text()) if path.is_file() else None
    except (OSError, json.JSONDecodeError) as e:
        return Item("report", "failed", f"{path}: unreadable ({e})")
    if made is None:
        return Item("report", "missing", "no report/report.json")
    gone = [f for f in [*made.get("figures", []), *[made["atlas"]] * bool(made.get("atlas"))]
            if not (run.report_dir / f).is_file()]
    if gone:
        return Item("report", "incomplete", f"{len(gone)} figure(s) missing from report/: {', '.join(gone[:3])}")
    before, now = made.get("inputs") or {}, report_inputs(run, plan, sha)
    changed = [k for k in now if before.get(k, {} if k == "featviz" else None) != now[k]]  # featviz: added later
    if changed:
        what = {"checkpoint_sha256": "the checkpoint", "eval_checkpoint_sha256": "eval.json", "plan": "the plan",
                "shards": "the shards", "parts": "the projections", "featviz": "the feature visualizations"}
        return Item("report", "stale", "made before " + ", ".join(what[k] for k in changed) + " changed")
    if made.get("problems"):
        return Item("report", "partial", "; ".join(made["problems"])[:300])
    return Item("report", DONE, made.get("report", "report/report.html"))


def run_state(run: RunDir) -> RunState:
    """Every item of the run, verified from its files (see the module docstring)."""
    items, sha = _train_items(run)
    state = RunState(items, sha)
    try:
        state.plan = run.plan()
    except InputError as e:
        items.append(Item("viz", "failed", str(e).split(";")[0], "viz"))
        return state
    rec = run.manifest().viz
    if state.plan is None and rec.status:  # requested (a pipeline, launch_viz) but never planned
        items.append(Item("viz", rec.status if rec.status == "failed" else "not run",
                          rec.error or "no viz/plan.json", "viz"))
    elif state.plan is not None:
        items += _viz_items(run, state.plan, sha)
    items.append(_report_item(run, state.plan, sha))
    return state


def check_outcome(run: RunDir, stages: Sequence[str] = SCOPES) -> None:
    """Nothing when every item of `stages` (default: all; launch_viz: viz) verifies (hpcviz.runstate);
    StageFailed saying what is not, and how to redo it, otherwise."""
    state = run_state(run)
    bad = state.problems(stages)
    if not bad:
        return
    raise StageFailed(describe_problems(run, bad))


def describe_problems(run: RunDir, bad: list[Item]) -> str:
    """One line: the first items that are not done, then the command that redoes them."""
    where = Path(run.path)
    first = bad[0]
    if first.name == "train":
        why = f" ({first.detail.splitlines()[0]})" if first.detail else ""
        return (f"training {first.state}{why}; see {where / 'logs'} and {where / 'report' / 'report.html'}")
    if first.name == "viz" and first.state == "failed":
        return f"the visualization failed: {first.detail}; see {where / 'logs'}"
    if first.name == "viz":
        return f"no visualization plan: the array did not run; hint: python jobs/launch_viz.py --run {run}"
    shown = "; ".join(f"{i.name} {i.state}" + (f" ({i.detail})" if i.detail else "") for i in bad[:4])
    more = f"; and {len(bad) - 4} more" if len(bad) > 4 else ""
    if all(i.name in ("report", "project", "featviz") or i.name.startswith(("project[", "featviz[")) for i in bad):
        hint = f"python jobs/aggregate.py --run {run}"
    else:
        hint = f"python jobs/launch_pipeline.py --run {run} --retry-failed"
    return f"not complete: {shown}{more}; hint: {hint}"
