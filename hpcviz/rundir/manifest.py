"""manifest.json, typed: one record per stage (train, viz, aggregate) and one for the pipeline.

A record changes only when its stage really starts or ends. A launcher marks a stage `submitted`
with `begin` just before it submits (keeping the record it replaces in `previous`); when the
submission is refused, or the job refuses its input before it starts, `abandon` puts the previous
record back, so a refused command leaves the manifest as it was.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

STATUSES = ("pending", "submitted", "running", "stopped", "done", "partial", "failed", "cancelled")


@dataclass
class StageRecord:
    status: str = ""                  # one of STATUSES ("" = never ran)
    cluster: str = ""                 # slurm | local | debug | inline
    job_id: str = ""
    error: str = ""                   # why it failed, one line
    updated: str = ""                 # when this record last changed (local time, TIME_FORMAT)
    previous: dict[str, Any] | None = None  # the record a pending submission replaced (see module docstring)


@dataclass
class TrainRecord(StageRecord):
    host: str = ""
    world_size: int = 0
    device: str = ""                  # rank 0's, e.g. 'cuda:0 (NVIDIA H200, ...) on node7'
    data_placement: str = ""          # device | host | stream
    hpcviz_version: str = ""
    torch_version: str = ""
    dataset_fingerprint: str = ""
    classes: list[str] = field(default_factory=list)
    restarts: int = 0                 # requeues (time limit, preemption)
    epoch: int = 0                    # where a stopped run stands
    step: int = 0
    val_accuracy: float | None = None
    train_accuracy: float | None = None
    imported_from: str = ""           # the state dict an imported run's weights came from (no training here:
    imported_sha256: str = ""         # jobs/import_model.py), as given, and its sha256


@dataclass
class VizRecord(StageRecord):
    job_ids: list[str] = field(default_factory=list)        # SLURM arrays, oldest first
    tasks: dict[str, int] = field(default_factory=dict)     # array task id 'J_K' -> shard
    devices: dict[str, str] = field(default_factory=dict)   # shard -> the device it ran on
    n_shards: int = 0
    n_images: int = 0
    missing_shards: list[str] = field(default_factory=list)
    planned: str = ""                 # when viz/plan.json was written
    projection_ids: list[str] = field(default_factory=list)  # the second array's (projections), oldest first
    featviz_ids: list[str] = field(default_factory=list)     # the feature visualization array's, oldest first


@dataclass
class AggregateRecord(StageRecord):
    report: str = ""                  # relative to the run: report/report.html
    missing_shards: list[str] = field(default_factory=list)


@dataclass
class PipelineRecord:
    cluster: str = ""
    jobs: dict[str, Any] = field(default_factory=dict)  # {"train": id, "viz": [ids], "aggregate": id, "n_tasks": n}
    submitted: str = ""
    updated: str = ""


RECORDS: dict[str, type] = {"train": TrainRecord, "viz": VizRecord, "aggregate": AggregateRecord,
                            "pipeline": PipelineRecord}


@dataclass
class Manifest:
    train: TrainRecord = field(default_factory=TrainRecord)
    viz: VizRecord = field(default_factory=VizRecord)
    aggregate: AggregateRecord = field(default_factory=AggregateRecord)
    pipeline: PipelineRecord = field(default_factory=PipelineRecord)

    @classmethod
    def from_dict(cls, content: dict[str, Any]) -> Manifest:
        """Unknown keys (a manifest of another version) are dropped, never an error."""
        return cls(**{stage: record_from_dict(kind, content.get(stage) or {}) for stage, kind in RECORDS.items()})

    def to_dict(self) -> dict[str, Any]:
        return {stage: dataclasses.asdict(getattr(self, stage)) for stage in RECORDS
                if getattr(self, stage) != RECORDS[stage]()}  # stages that never ran stay out

    def record(self, stage: str) -> Any:
        return getattr(self, stage)


def record_from_dict(kind: type, values: dict[str, Any]) -> Any:
    names = {f.name for f in dataclasses.fields(kind)}
    return kind(**{k: v for k, v in values.items() if k in names})


def changed(record: Any, fields: dict[str, Any]) -> Any:
    """`record` with `fields` set; a misspelt field is an error (the manifest is typed)."""
    names = {f.name for f in dataclasses.fields(record)}
    unknown = sorted(set(fields) - names)
    assert not unknown, f"{type(record).__name__} has no fields {unknown}"
    return dataclasses.replace(record, **fields)


def without_previous(record: Any) -> dict[str, Any]:
    out = dataclasses.asdict(record)
    out.pop("previous", None)
    return out
