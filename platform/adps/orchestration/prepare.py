"""Data preparation on Ray: raw FastMRI volumes -> prepared shards + manifest (``adps prepare``).

The job, in order:

1. **Scan** (Ray tasks over batches of files): read every ``.h5`` under ``config.source`` (local
   or ``s3://``) for its acquisition, patient, slice and coil counts; a file that cannot be
   opened or breaks the FastMRI schema is *rejected* with its reason.
2. **Plan** (:func:`plan_volumes`, deterministic): keep ``config.acquisition``'s volumes, draw
   ``n_volumes`` with the seed, split them by patient (none crosses splits) into test, val, train.
3. **Prepare** (one Ray task per volume, ``num_cpus=config.cpus_per_task``):
   :func:`adps.data.preprocess.preprocess_slice` on each centre slice; a volume whose reading or
   preparation fails (truncated file, bad k-space) is rejected and the job goes on.
4. **Pack** (the driver, as results arrive): each split's slices, in plan order, are cut into
   shards of ``config.shard_size``, each written as soon as its slices are in (memory holds only
   a window of volumes) and followed by a save of the resume state; the manifest comes last.

Resuming: the state (plan, each volume's outcome, each written shard's sha256) lives in
``.prepare-progress.json`` next to the shards and in the manifest. A re-run with the same config
verifies the recorded shards, re-processes only the volumes feeding a missing or corrupt shard
and produces byte-identical files (with nothing to redo it writes nothing); a different config
aimed at the same output is refused.
"""

from __future__ import annotations

import collections
import logging
import math
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import ray
from tqdm.auto import tqdm

from adps.data import storage
from adps.data.fastmri import FastMRIFormatError, list_volumes, open_volume
from adps.data.preprocess import (
    COMPRESSED_SPLITS,
    EXECUTION_ONLY_KEYS,
    SPLITS,
    PrepareConfig,
    mask_key,
    preprocess_slice,
    shard_arrays,
    slice_id,
    volume_id,
)
from adps.data.shards import (
    FORMAT_NAME,
    MANIFEST_NAME,
    PROGRESS_NAME,
    SCHEMA_VERSION,
    SHARD_SUFFIX,
    ShardInfo,
    check_shard_names,
    read_json,
    schema_version_message,
    shard_name,
    slice_checksum,
    verify_shard,
    write_json_if_changed,
    write_shard,
)

log = logging.getLogger("adps.prepare")

# Failures that mean "this volume is bad", not "the program is wrong": they reject the volume and
# the job goes on. Anything else (a bug) fails the job loudly.
VOLUME_ERRORS = (FastMRIFormatError, ValueError, OSError, KeyError)

# Keys that may differ between a recorded and a new config without the output being refused:
# execution settings, and where the output is (the folder may have been moved or renamed).
_NOT_COMPARED = (*EXECUTION_ONLY_KEYS, "output")


# Scanning ----------------------------------------------------------------------------------------
def scan_volume(source: str, slices_per_volume: int) -> dict[str, Any]:
    """What the plan needs of one source file, or why it is rejected.

    Returns ``{"source", "ok": True, "acquisition", "patient_id", "num_slices", "num_coils",
    "kspace_shape", "slice_indices"}`` or ``{"source", "ok": False, "reason"}``.
    """
    try:
        with open_volume(source) as volume:
            # Only volumes of the wanted acquisition need enough slices; others are skipped anyway.
            indices = volume.centre_slices(slices_per_volume) if volume.num_slices >= slices_per_volume else None
            return {"source": source, "ok": True, "acquisition": volume.acquisition, "patient_id": volume.patient_id,
                    "num_slices": volume.num_slices, "num_coils": volume.num_coils,
                    "kspace_shape": list(volume.kspace_shape), "slice_indices": indices}
    except VOLUME_ERRORS as err:
        return {"source": source, "ok": False, "reason": _reason(err)}


def _scan_batch(sources: list[str], slices_per_volume: int) -> list[dict[str, Any]]:
    return [scan_volume(source, slices_per_volume) for source in sources]


def _reason(err: BaseException) -> str:
    """A rejection reason: the message, with the error type where the message alone is unclear."""
    if isinstance(err, FastMRIFormatError):
        return err.reason
    if isinstance(err, ValueError):  # our own checks: the message names the slice and the problem
        return str(err)
    return f"{type(err).__name__}: {err}"


# Planning ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class VolumePlan:
    """One drawn volume: where it is, which split it goes to and which slices are taken."""

    source: str
    volume_id: str
    patient_id: str
    split: str
    slice_indices: tuple[int, ...]
    num_coils: int

    def to_dict(self) -> dict[str, Any]:
        return {"source": self.source, "volume_id": self.volume_id, "patient_id": self.patient_id,
                "slice_indices": list(self.slice_indices), "num_coils": self.num_coils}


@dataclass
class Plan:
    """The deterministic outcome of scanning and drawing (recorded for resuming)."""

    volumes: dict[str, list[VolumePlan]]
    """Per split, its volumes in processing order (sorted by volume id)."""
    coils: dict[str, int]
    """Per split, its shards' coil count (uncompressed: the most of its volumes'; fewer are zero-padded)."""
    source_summary: dict[str, Any]
    """Counts of files listed, matching the acquisition, and drawn."""
    scan_rejected: list[dict[str, str]] = field(default_factory=list)
    """Files rejected before the draw (unreadable, wrong schema, too few slices)."""


def plan_volumes(config: PrepareConfig, scanned: Iterable[Mapping[str, Any]]) -> Plan:
    """Filter by acquisition, split by patient, draw ``n_volumes`` training volumes with the seed.

    Deterministic in ``(config, scanned)``: candidates are sorted by volume id before the seeded
    shuffle and draw, so the source's listing order does not matter. Shuffled patients go whole
    to test until it holds ``test_volumes`` volumes, then to validation (``val_volumes``; a
    patient's extra volumes can overshoot either); ``n_volumes`` training volumes are drawn from
    the other patients' (the paper: 2,000 training scans, test and validation from other scans).
    With ``held_out_within_draw`` the ``n_volumes`` are drawn first and test and validation
    taken out of them.
    """
    records = sorted(scanned, key=lambda r: (volume_id(r["source"]), r["source"]))
    rejected = [{"source": r["source"], "reason": r["reason"]} for r in records if not r["ok"]]
    matching = [r for r in records if r["ok"] and r["acquisition"] == config.acquisition]
    usable = []
    for record in matching:
        if record["slice_indices"] is None:
            reason = f"has {record['num_slices']} slices, fewer than slices_per_volume={config.slices_per_volume}"
            rejected.append({"source": record["source"], "reason": reason})
        else:
            usable.append(record)
    ids = [volume_id(r["source"]) for r in usable]
    duplicates = sorted({i for i in ids if ids.count(i) > 1})
    if duplicates:
        raise ValueError(f"{config.source}: several files share the volume id {duplicates[0]!r} (slice ids and "
                         "masks derive from the file name, so names must be unique)")

    draw_rng = np.random.default_rng(np.random.SeedSequence([config.seed, 0]))
    split_rng = np.random.default_rng(np.random.SeedSequence([config.seed, 1]))

    def draw(candidates: list[Mapping[str, Any]], count: int, what: str) -> list[Mapping[str, Any]]:
        if len(candidates) > count:
            return [candidates[i] for i in np.sort(draw_rng.choice(len(candidates), size=count, replace=False))]
        if len(candidates) < count:
            log.warning("%s: %d usable %s volumes for %s, fewer than n_volumes=%d: using all of them",
                        config.source, len(candidates), config.acquisition, what, count)
        return list(candidates)

    def by_patient(candidates: list[Mapping[str, Any]]) -> dict[str, list[Mapping[str, Any]]]:
        grouped: dict[str, list[Mapping[str, Any]]] = collections.defaultdict(list)
        for record in candidates:
            grouped[str(record["patient_id"])].append(record)
        return grouped

    def plan_of(record: Mapping[str, Any], patient: str, split: str) -> VolumePlan:
        return VolumePlan(source=record["source"], volume_id=volume_id(record["source"]), patient_id=patient,
                          split=split, slice_indices=tuple(int(i) for i in record["slice_indices"]),
                          num_coils=int(record["num_coils"]))

    wanted = {"test": config.test_volumes, "val": config.val_volumes}
    assigned: dict[str, list[VolumePlan]] = {split: [] for split in SPLITS}
    if config.held_out_within_draw:
        # Test and validation out of the n_volumes drawn (fewer training scans than drawn).
        pool = by_patient(draw(usable, config.n_volumes, "all splits"))
        for index in split_rng.permutation(len(pool)):
            patient = sorted(pool)[index]
            split = next((s for s in ("test", "val") if len(assigned[s]) < wanted[s]), "train")
            assigned[split] += [plan_of(record, patient, split) for record in pool[patient]]
        drawn_count = sum(len(v) for v in pool.values())
    else:
        # The paper: test and validation scans first, whole patients, then n_volumes training scans
        # drawn from the other patients' (METHOD.md: 100 test slices from scans outside the 2,000).
        pool = by_patient(usable)
        patients = sorted(pool)
        rest: list[Mapping[str, Any]] = []
        for index in split_rng.permutation(len(patients)):
            patient = patients[index]
            split = next((s for s in ("test", "val") if len(assigned[s]) < wanted[s]), None)
            if split is None:
                rest += [dict(record, patient_id=patient) for record in pool[patient]]
            else:
                assigned[split] += [plan_of(record, patient, split) for record in pool[patient]]
        rest.sort(key=lambda r: (volume_id(r["source"]), r["source"]))
        training = draw(rest, config.n_volumes, "training")
        assigned["train"] = [plan_of(record, str(record["patient_id"]), "train") for record in training]
        drawn_count = len(training) + len(assigned["test"]) + len(assigned["val"])
    volumes = {split: sorted(assigned[split], key=lambda v: v.volume_id) for split in SPLITS}
    coils = {split: config.virtual_coils if split in COMPRESSED_SPLITS
             else max((v.num_coils for v in volumes[split]), default=0) for split in SPLITS}
    summary = {"root": config.source, "listed": len(records), "matching_acquisition": len(matching),
               "drawn": drawn_count}
    return Plan(volumes=volumes, coils=coils, source_summary=summary, scan_rejected=rejected)


# Preparing one volume ---------------------------------------------------------------------------
def prepare_volume(plan: VolumePlan, coils: int,
                   config: PrepareConfig) -> tuple[dict[str, Any], list[dict[str, Any]] | None]:
    """Read a volume's planned slices and prepare each; the body of the per-volume Ray task.

    Args:
        plan: the volume, its split and slice indices.
        coils: the split's shard coil count; slices with fewer are zero-padded to it (a zero coil
            has zero k-space and maps: A, A^H and every reconstruction are unchanged).
        config: the preparation settings.

    Returns:
        ``(summary, payload)``. ``summary`` is small: ``volume_id``, ``ok``, ``reason`` (if
        rejected), ``n_slices``, ``seconds`` and per-stage ``timings``. ``payload`` is, per
        slice, ``{"meta": manifest entry, "arrays": shard arrays}``, or None if rejected.
    """
    started = time.perf_counter()
    timings: dict[str, float] = {}
    summary: dict[str, Any] = {"volume_id": plan.volume_id, "source": plan.source, "split": plan.split}
    try:
        with open_volume(plan.source) as volume:
            kspace = volume.read_slices(list(plan.slice_indices))
        timings["reading"] = time.perf_counter() - started
        payload = []
        for slice_index, slice_kspace in zip(plan.slice_indices, kspace, strict=True):
            sid = slice_id(plan.volume_id, slice_index)
            prepared = preprocess_slice(slice_kspace, split=plan.split, slice_id=sid, config=config,
                                        label=f"{plan.source} slice {slice_index}", timings=timings)
            arrays = _pad_coils(shard_arrays(prepared), coils)
            meta = {"source": plan.source, "volume_id": plan.volume_id, "patient_id": plan.patient_id,
                    "slice_index": int(slice_index), "slice_id": sid, "coils": int(prepared["kspace"].shape[0]),
                    "normalization": float(prepared["normalization"]), "noise_std": float(prepared["noise_std"]),
                    "coil_energy_kept": float(prepared["coil_energy_kept"]), "sha256": slice_checksum(arrays)}
            payload.append({"meta": meta, "arrays": arrays})
    except VOLUME_ERRORS as err:
        summary.update(ok=False, reason=_reason(err), n_slices=0, seconds=time.perf_counter() - started,
                       timings=timings)
        return summary, None
    summary.update(ok=True, n_slices=len(payload), seconds=time.perf_counter() - started, timings=timings)
    return summary, payload


def _pad_coils(arrays: dict[str, np.ndarray], coils: int) -> dict[str, np.ndarray]:
    have = arrays["kspace"].shape[0]
    if have == coils:
        return arrays
    if have > coils:  # the plan's coil count is the split's maximum: a bug, not bad data
        raise RuntimeError(f"slice has {have} coils, more than the split's {coils}")
    padded = dict(arrays)
    for key in ("kspace", "maps"):
        extra = np.zeros((coils - have, *arrays[key].shape[1:]), dtype=arrays[key].dtype)
        padded[key] = np.concatenate([arrays[key], extra])
    return padded


def _prepare_volume_task(plan: VolumePlan, coils: int, config_dict: dict[str, Any]):
    import torch

    # One thread, whatever the task reserves: a multi-threaded reduction's order depends on the thread
    # count, and the shards' bytes must not depend on the cluster (resumes and reruns reproduce them).
    # Parallelism is one task per volume; Ray already gives numpy's BLAS one thread (OMP_NUM_THREADS=1).
    torch.set_num_threads(1)
    return prepare_volume(plan, coils, PrepareConfig.from_dict(config_dict))


# Resume state ------------------------------------------------------------------------------------
@dataclass
class _Outcome:
    """A processed volume: rejected with a reason, or its slices' manifest entries in order."""

    rejected: str | None
    slices: list[dict[str, Any]]


@dataclass
class _State:
    plan: Plan
    outcomes: dict[str, dict[str, _Outcome]]
    """Per split, volume id -> outcome, for a prefix of the split's volumes."""
    shards: dict[str, dict[str, ShardInfo]]
    """Per split, shard name -> recorded info."""


def _document(config: PrepareConfig, state: _State, *, complete: bool) -> dict[str, Any]:
    """The manifest (``complete``) or the progress document: one structure for both."""
    rows, cols = config.crop
    rejected = list(state.plan.scan_rejected)
    splits: dict[str, Any] = {}
    for split in SPLITS:
        outcomes = state.outcomes[split]
        volumes, slices = [], []
        for volume in state.plan.volumes[split]:
            outcome = outcomes.get(volume.volume_id)
            status = "pending" if outcome is None else ("rejected" if outcome.rejected else "ok")
            volumes.append({**volume.to_dict(), "status": status})
            if outcome is None:
                continue
            if outcome.rejected:
                rejected.append({"source": volume.source, "reason": outcome.rejected})
            for meta in outcome.slices:
                position = len(slices)
                slices.append({**meta, "shard": shard_name(split, position // config.shard_size),
                               "row": position % config.shard_size})
        shards = [state.shards[split][name].to_dict() for name in sorted(state.shards[split])]
        n_volumes = sum(1 for v in volumes if v["status"] == "ok")
        splits[split] = {"coils": state.plan.coils[split], "shape": [rows, cols], "n_volumes": n_volumes,
                         "n_slices": len(slices), "volumes": volumes, "shards": shards, "slices": slices}
    document = {"format": FORMAT_NAME, "schema_version": SCHEMA_VERSION, "config": config.to_dict(),
                "source": state.plan.source_summary, "datasets": _dataset_names(config), "splits": splits,
                "rejected": sorted(rejected, key=lambda r: (r["source"], r["reason"]))}
    if not complete:
        document["complete"] = False
    return document


def _dataset_names(config: PrepareConfig) -> list[str]:
    """The HDF5 datasets every shard of this config holds."""
    names = ["kspace", "maps", "reference", "slice_id"]
    for acceleration in config.accelerations:
        names += [f"mask/{mask_key(acceleration)}", f"mask_further/{mask_key(acceleration)}"]
        if config.l1:
            names.append(f"l1/{mask_key(acceleration)}")
    if config.mvue:
        names.append("mvue")
    return sorted(names)


def _state_from_document(document: Mapping[str, Any]) -> _State:
    """Rebuild the resume state from a manifest or progress document."""
    volumes: dict[str, list[VolumePlan]] = {}
    outcomes: dict[str, dict[str, _Outcome]] = {}
    shards: dict[str, dict[str, ShardInfo]] = {}
    in_splits: set[str] = set()
    reasons = {r["source"]: r["reason"] for r in document["rejected"]}
    for split in SPLITS:
        entry = document["splits"][split]
        volumes[split] = [VolumePlan(source=v["source"], volume_id=v["volume_id"], patient_id=v["patient_id"],
                                     split=split, slice_indices=tuple(v["slice_indices"]), num_coils=v["num_coils"])
                          for v in entry["volumes"]]
        in_splits.update(v["source"] for v in entry["volumes"])
        by_volume: dict[str, list[dict[str, Any]]] = collections.defaultdict(list)
        for meta in entry["slices"]:
            by_volume[meta["volume_id"]].append({k: v for k, v in meta.items() if k not in ("shard", "row")})
        outcomes[split] = {}
        for v in entry["volumes"]:
            if v["status"] == "ok":
                outcomes[split][v["volume_id"]] = _Outcome(rejected=None, slices=by_volume[v["volume_id"]])
            elif v["status"] == "rejected":
                outcomes[split][v["volume_id"]] = _Outcome(rejected=reasons.get(v["source"], "rejected"), slices=[])
        shards[split] = {s["name"]: ShardInfo(**s) for s in entry["shards"]}
    plan = Plan(volumes=volumes, coils={split: document["splits"][split]["coils"] for split in SPLITS},
                source_summary=document["source"],
                scan_rejected=[r for r in document["rejected"] if r["source"] not in in_splits])
    return _State(plan=plan, outcomes=outcomes, shards=shards)


def _config_differences(recorded: Mapping[str, Any], config: PrepareConfig) -> list[str]:
    current = config.to_dict()
    keys = sorted((set(recorded) | set(current)) - set(_NOT_COMPARED))
    return [f"{key}: {recorded.get(key, '(absent)')!r} -> {current.get(key, '(absent)')!r}"
            for key in keys if recorded.get(key) != current.get(key)]


def _load_recorded(config: PrepareConfig) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
    """The existing manifest and progress documents at the output (None where absent).

    Raises ValueError if either was made with a different config or names a shard outside the output.
    """
    found = {}
    for name in (MANIFEST_NAME, PROGRESS_NAME):
        uri = storage.join(config.output, name)
        if not storage.exists(uri):
            found[name] = None
            continue
        document = read_json(uri)
        if document.get("format") != FORMAT_NAME:
            raise ValueError(f"{uri}: not an adps prepared dataset; choose another output folder or delete this one")
        if document.get("schema_version") != SCHEMA_VERSION:
            raise ValueError(f"{schema_version_message(uri, document.get('schema_version'))}; or delete this "
                             "folder to prepare into it again")
        # A resume hashes every recorded shard: never one outside the output folder.
        check_shard_names(document, uri)
        differences = _config_differences(document.get("config", {}), config)
        if differences:
            raise ValueError(f"{config.output} holds a dataset prepared with a different config "
                             f"({'; '.join(differences)}); choose another output folder, or delete this one to "
                             "start over")
        found[name] = document
    return found[MANIFEST_NAME], found[PROGRESS_NAME]


# Packing -----------------------------------------------------------------------------------------
class _SplitPacker:
    """Cuts one split's slice stream into shards, in plan order, writing those not already verified.

    The layout is a pure function of the volumes' outcomes: the accepted volumes' slices,
    concatenated in plan order, cut every ``shard_size`` slices. So the shards covering a
    recorded prefix of outcomes are known in advance, and a volume needs processing only if
    its outcome is unknown or one of its shards must be (re)written.
    """

    def __init__(self, split: str, state: _State, verified: set[str], config: PrepareConfig,
                 on_shard_written: Callable[[], None] = lambda: None) -> None:
        self.split = split
        self.on_shard_written = on_shard_written
        self.config = config
        self.state = state
        self.volumes = state.plan.volumes[split]
        self.recorded = dict(state.outcomes[split])
        self.verified = verified
        self.next_volume = 0
        self.shards_emitted = 0
        self.stream: list[tuple[dict[str, Any], dict[str, np.ndarray] | None]] = []
        self.needs = self._needs_processing()
        # Recorded manifest entries by slice id: a kept shard keeps the entries it was written with.
        self.recorded_slices = {meta["slice_id"]: meta for outcome in self.recorded.values() for meta in outcome.slices}

    def _needs_processing(self) -> list[bool]:
        size = self.config.shard_size
        spans: list[tuple[int, int]] = []
        position = 0
        for volume in self.volumes:
            outcome = self.recorded.get(volume.volume_id)
            if outcome is None:
                break
            spans.append((position, len(outcome.slices)))
            position += len(outcome.slices)
        complete = len(spans) == len(self.volumes)

        def shard_ok(index: int) -> bool:
            start, end = index * size, min((index + 1) * size, position)
            determined = (index + 1) * size <= position or (complete and start < position)
            name = shard_name(self.split, index)
            info = self.state.shards[self.split].get(name)
            return determined and name in self.verified and info is not None and info.n_slices == end - start

        needs = []
        for start, count in spans:
            shards = range(start // size, (start + count - 1) // size + 1) if count else range(0)
            needs.append(not all(shard_ok(j) for j in shards))
        return needs + [True] * (len(self.volumes) - len(spans))  # volumes with no recorded outcome

    def consume(self, index: int, outcome: _Outcome, payload: list[dict[str, Any]] | None, *, fresh: bool) -> int:
        """Add volume ``index``'s outcome (in order) and write every shard it completes; returns how many.

        ``fresh``: the outcome comes from processing now (``payload`` holds its arrays unless it
        was rejected), not from the record of an earlier run.
        """
        if index != self.next_volume:
            raise RuntimeError(f"{self.split}: volume {index} consumed out of order (expected {self.next_volume})")
        volume = self.volumes[index]
        recorded = self.recorded.get(volume.volume_id)
        if recorded is not None and fresh:
            # A re-processed volume must reproduce its recorded outcome, or the shard layout after it breaks.
            if (recorded.rejected is None) != (outcome.rejected is None) or len(recorded.slices) != len(outcome.slices):
                was = f"rejected ({recorded.rejected})" if recorded.rejected else f"{len(recorded.slices)} slices"
                now = f"rejected ({outcome.rejected})" if outcome.rejected else f"{len(outcome.slices)} slices"
                raise ValueError(f"{volume.source}: changed since the recorded run ({was}, now {now}); the output "
                                 f"{self.config.output} cannot be resumed: prepare into a new folder")
        self.state.outcomes[self.split][volume.volume_id] = outcome
        arrays = [item["arrays"] for item in payload] if payload is not None else [None] * len(outcome.slices)
        self.stream.extend(zip(outcome.slices, arrays, strict=True))
        self.next_volume += 1
        written = 0
        while len(self.stream) >= self.config.shard_size:
            written += self._emit(self.stream[: self.config.shard_size])
            self.stream = self.stream[self.config.shard_size :]
        if self.next_volume == len(self.volumes) and self.stream:
            written += self._emit(self.stream)
            self.stream = []
        return written

    def _emit(self, items: list[tuple[dict[str, Any], dict[str, np.ndarray] | None]]) -> int:
        name = shard_name(self.split, self.shards_emitted)
        self.shards_emitted += 1
        recorded = self.state.shards[self.split].get(name)
        if name in self.verified and recorded is not None and recorded.n_slices == len(items):
            # A re-processed volume may straddle this kept shard: its entries must describe the
            # file as it is (they differ only if processing is not bit-reproducible here).
            for meta, _ in items:
                meta.update(self.recorded_slices.get(meta["slice_id"], {}))
            return 0
        if any(arrays is None for _, arrays in items):
            raise RuntimeError(f"{name}: a slice of a skipped volume is needed to write this shard")  # a bug
        info = write_shard(
            storage.join(self.config.output, name), [arrays for _, arrays in items],  # type: ignore[misc]
            slice_ids=[meta["slice_id"] for meta, _ in items], attrs={"split": self.split}
        )
        self.state.shards[self.split][name] = info
        self.verified.add(name)
        # Record it at once: an interruption after this point must not cost this shard.
        self.on_shard_written()
        return 1

    @property
    def done(self) -> bool:
        return self.next_volume == len(self.volumes)


# The job ------------------------------------------------------------------------------------------
def prepare_dataset(config: PrepareConfig, *, ray_address: str | None = None, progress: bool = True) -> dict[str, Any]:
    """Prepare ``config.source`` into ``config.output``; returns the manifest.

    Resumes an interrupted run of the same config (redoing only what is missing or corrupt); does
    nothing when the output is complete and verifies.

    Args:
        config: the preparation settings (validated here).
        ray_address: a Ray cluster to connect to; by default an already initialised Ray is used,
            else ``ray.init()`` joins the cluster named by ``RAY_ADDRESS`` or starts a local one.
        progress: show a progress bar (slices done / total, slices/s).

    Raises:
        ValueError: invalid config, a different config already at the output, or no usable
            volume in the source.
    """
    config.validate()
    manifest, progress_doc = _load_recorded(config)
    # The manifest, when there, records a finished run; else the progress file an unfinished one.
    recorded = manifest or progress_doc
    state: _State | None = None
    verified: set[str] = set()
    if recorded is not None:
        state = _state_from_document(recorded)
        failures = _verify_recorded_shards(config, state, verified)
        if manifest is not None and not failures:
            log.info("%s is complete and every shard verifies: nothing to do", config.output)
            return manifest
        log.info("resuming the recorded preparation in %s: %d shard(s) verify, %d to rewrite%s",
                 config.output, len(verified), len(failures), f" ({'; '.join(failures[:5])})" if failures else "")
        _remove_stale_temporaries(config.output)

    started_ray = _ensure_ray(ray_address)
    try:
        if state is None:
            plan = _scan_and_plan(config)
            state = _State(plan=plan, outcomes={s: {} for s in SPLITS}, shards={s: {} for s in SPLITS})
            write_json_if_changed(storage.join(config.output, PROGRESS_NAME), _document(config, state, complete=False))
        _run(config, state, verified, progress=progress)
    finally:
        if started_ray:
            ray.shutdown()

    document = _document(config, state, complete=True)
    write_json_if_changed(storage.join(config.output, PROGRESS_NAME), document)
    # The manifest last: a reader who finds it finds every shard it lists.
    write_json_if_changed(storage.join(config.output, MANIFEST_NAME), document)
    totals = ", ".join(f"{s} {document['splits'][s]['n_slices']} slices" for s in SPLITS)
    log.info("prepared %s: %s; %d rejected", config.output, totals, len(document["rejected"]))
    return document


def _remove_stale_temporaries(output: str) -> None:
    """Delete temporary files a killed run left in a local output (``name.tmp-<uuid>``).

    Only a hard kill leaves them (S3 uploads leave nothing); two runs into one output at once are
    not supported, so nothing else can be writing them.
    """
    if storage.is_s3(output):
        return
    folder = Path(output)
    for pattern in (f"*{SHARD_SUFFIX}.tmp-*", "*.json.tmp-*"):
        for path in folder.glob(pattern):
            log.info("removing %s, left by an interrupted run", path)
            path.unlink(missing_ok=True)


def _ensure_ray(address: str | None) -> bool:
    """Initialise Ray unless it already is; returns whether this call did (and should shut down)."""
    if ray.is_initialized():
        return False
    if address:
        log.info("connecting to the Ray cluster at %s", address)
    else:
        log.info("no Ray address given: joining the cluster of RAY_ADDRESS or `ray start` if there is one, "
                 "else starting a local Ray instance")
    context = ray.init(address=address, ignore_reinit_error=True)
    cpus = ray.cluster_resources().get("CPU", 0)
    dashboard = getattr(context, "dashboard_url", None)
    log.info("Ray ready: %g CPUs%s", cpus, f", dashboard http://{dashboard}" if dashboard else "")
    return True


def _verify_recorded_shards(config: PrepareConfig, state: _State, verified: set[str]) -> list[str]:
    """Check every recorded shard; add those that verify to ``verified``; return the failures."""
    failures = []
    for split in SPLITS:
        for name, info in sorted(state.shards[split].items()):
            problem = verify_shard(storage.join(config.output, name), info.sha256)
            if problem is None:
                verified.add(name)
            else:
                failures.append(f"{name}: {problem}")
    return failures


def _scan_and_plan(config: PrepareConfig) -> Plan:
    sources = list_volumes(config.source)
    if not sources:
        raise ValueError(f"{config.source}: no .h5 files found")
    cpus = max(1.0, ray.cluster_resources().get("CPU", 1.0))
    batch = max(1, min(64, math.ceil(len(sources) / (4 * cpus))))
    scan = ray.remote(num_cpus=config.cpus_per_task)(_scan_batch)
    log.info("scanning %d files in %s", len(sources), config.source)
    refs = [scan.remote(sources[i : i + batch], config.slices_per_volume) for i in range(0, len(sources), batch)]
    scanned = [record for records in ray.get(refs) for record in records]
    plan = plan_volumes(config, scanned)
    counts = ", ".join(f"{s} {len(plan.volumes[s])}" for s in SPLITS)
    log.info("%d files, %d %s, %d drawn (%s volumes), %d rejected at scan", len(sources),
             plan.source_summary["matching_acquisition"], config.acquisition, plan.source_summary["drawn"], counts,
             len(plan.scan_rejected))
    if not any(plan.volumes.values()):
        reasons = "; ".join(f"{r['source']}: {r['reason']}" for r in plan.scan_rejected[:3])
        rejected = f" (rejected: {reasons})" if reasons else ""
        raise ValueError(f"{config.source}: no usable {config.acquisition} volume among {len(sources)} files{rejected}")
    return plan


def _run(config: PrepareConfig, state: _State, verified: set[str], *, progress: bool) -> None:
    """Process what is needed, packing shards in order as results arrive, saving state per shard."""
    progress_uri = storage.join(config.output, PROGRESS_NAME)

    def save_progress() -> None:
        write_json_if_changed(progress_uri, _document(config, state, complete=False))

    packers = {split: _SplitPacker(split, state, verified, config, save_progress) for split in SPLITS}
    # The test split first: its volumes keep all coils and cost several times a compressed one,
    # and starting the longest tasks first keeps the run from ending on a long tail.
    work = [(split, i) for split in ("test", "val", "train") for i, needed in enumerate(packers[split].needs) if needed]
    total_slices = sum(len(state.plan.volumes[s][i].slice_indices) for s, i in work)
    skipped = sum(len(p.volumes) for p in packers.values()) - len(work)
    if skipped:
        log.info("%d volume(s) already in verified shards are skipped; %d to process", skipped, len(work))
    cpus = max(1.0, ray.cluster_resources().get("CPU", 1.0))
    parallel = max(1, int(cpus // config.cpus_per_task))
    # Tasks submitted and not finished: enough to keep every CPU busy, not the whole dataset.
    max_in_flight = 2 * parallel
    # Finished volumes waiting for an earlier one of their split to be packed: memory stays bounded.
    max_waiting = max(8, 4 * parallel)
    task = ray.remote(num_cpus=config.cpus_per_task, num_returns=2)(_prepare_volume_task)
    config_dict = config.to_dict()

    queue = collections.deque(work)
    in_flight: dict[Any, tuple[str, int, Any]] = {}  # summary ref -> (split, index, payload ref)
    finished: dict[tuple[str, int], tuple[dict[str, Any], Any]] = {}
    started = time.monotonic()
    done_slices, task_seconds = 0, 0.0
    stage_seconds: dict[str, float] = collections.defaultdict(float)
    bar = tqdm(total=total_slices, unit="slice", desc="prepare", disable=not progress, dynamic_ncols=True)
    try:
        while True:
            _pack_ready(packers, finished)
            while queue and len(in_flight) < max_in_flight and len(finished) < max_waiting:
                split, index = queue.popleft()
                volume = state.plan.volumes[split][index]
                summary_ref, payload_ref = task.remote(volume, state.plan.coils[split], config_dict)
                in_flight[summary_ref] = (split, index, payload_ref)
            if all(p.done for p in packers.values()):
                break
            if not in_flight:
                raise RuntimeError("no task in flight but splits are unfinished")  # a bug
            ready, _ = ray.wait(list(in_flight), num_returns=1)
            for ref in ready:
                split, index, payload_ref = in_flight.pop(ref)
                summary = ray.get(ref)
                finished[(split, index)] = (summary, payload_ref)
                task_seconds += summary["seconds"]
                for stage, seconds in summary["timings"].items():
                    stage_seconds[stage] += seconds
                planned = len(state.plan.volumes[split][index].slice_indices)
                if summary["ok"]:
                    done_slices += summary["n_slices"]
                    bar.update(summary["n_slices"])
                else:
                    log.warning("rejected %s: %s", summary["source"], summary["reason"])
                    bar.total -= planned  # the bar's total counts only slices that will come
                    bar.refresh()
    finally:
        bar.close()
    elapsed = time.monotonic() - started
    if done_slices:
        # Task time against the CPU slots shows how busy the cluster was (scheduling, start-up
        # and packing overheads are the rest); the stage split shows where the time goes.
        stats = {"slices": done_slices, "wall_s": elapsed, "task_s": task_seconds, "slots": parallel,
                 "stages_s": dict(stage_seconds)}
        stages = ", ".join(f"{k} {v:.1f}" for k, v in stage_seconds.items())
        log.info("processed %d slices in %.1f s (%.2f slices/s); tasks busy %.0f%% of %d CPU slots; task seconds: %s",
                 done_slices, elapsed, done_slices / elapsed, 100 * task_seconds / (elapsed * parallel), parallel,
                 stages, extra={"prepare_stats": stats})


def _pack_ready(packers: dict[str, _SplitPacker], finished: dict[tuple[str, int], tuple[dict[str, Any], Any]]) -> None:
    """Feed each split's packer every volume that is next in order and available."""
    for split, packer in packers.items():
        while not packer.done:
            index = packer.next_volume
            volume = packer.volumes[index]
            if not packer.needs[index]:
                packer.consume(index, packer.recorded[volume.volume_id], None, fresh=False)
                continue
            if (split, index) not in finished:
                break
            summary, payload_ref = finished.pop((split, index))
            payload = ray.get(payload_ref) if summary["ok"] else None
            outcome = _Outcome(rejected=None if summary["ok"] else summary["reason"],
                               slices=[item["meta"] for item in payload] if payload is not None else [])
            packer.consume(index, outcome, payload, fresh=True)
