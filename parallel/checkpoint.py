"""Distributed checkpoints through torch.distributed.checkpoint (DCP): atomic, named independently of the
layout, and resharded on load.

On disk: RUN_DIR/checkpoints/step_N/ holds DCP's files (one per rank plus .metadata), meta.json (step, model
shape, the layout it was saved under, the size and CRC-32C of every file, the run lineage it belongs to) and
a COMPLETE marker. A save writes step_N.tmp; rank 0 writes meta.json and COMPLETE only after every rank's
files are on disk, then renames the directory. A crash mid-save leaves a .tmp directory (or one without
COMPLETE) that is never taken for a checkpoint, and the next save removes it. Each rank checksums its files
while writing them (parallel/checksums.py); `resolve` verifies them before a checkpoint is used.

Keep-last-K only ever deletes saves of the saving run's own lineage (the run that started it and every run
resumed from its saves): a directory holding other runs' checkpoints loses none of them.

A save may also run in the background (`start_save(stager=...)`, DCP's async_save, from host copies that
parallel/staging.py keeps from save to save): the sealing then waits in `finish_save` until every rank's
write has finished.

Names do not depend on the layout: entries are keyed by full-model FQNs ("model.layers.3.moe.experts.w1",
"optim.layers.3.moe.experts.w1.exp_avg"), and every sharded tensor is a DTensor that knows its global shape
and offset. TP and FSDP parameters are DTensors already; expert weights under EP are plain local
[E/ep, ...] slices (or FSDP's edp shards of them), which are described as DTensors over the expert mesh
without moving data (`layout_free`). Every rank writes and reads only its own shards: no tensor is gathered,
and DCP reads whichever saved chunks another layout needs.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
import warnings
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp

from moeyard.moe.config import ModelConfig, MoEConfig
from moeyard.parallel.checksums import ALGORITHM, ChecksumWriter, file_checksum, first_mismatch
from moeyard.parallel.muon import Muon
from moeyard.parallel.safe_metadata import SafeFileSystemReader
from moeyard.parallel.shards import layout_free
from moeyard.parallel.staging import HostStager
from moeyard.parallel.zero import ZeroAdamW

CHECKPOINTS = "checkpoints"
FORMAT = 2
READS = (1, 2)
"""Formats this moeyard loads: 1 predates checksums (its files are checked by size only)."""
DCP_METADATA = "dcp_metadata"
"""Key of `read_meta`'s result holding the parsed DCP .metadata (in memory only, never in meta.json)."""
_STEP_DIR = re.compile(r"^step_(\d+)$")
# Fields that decide tensor shapes: a checkpoint loads only into a model that agrees on all of them. A field
# that a checkpoint predates is read as its default (the shape every model had before the field existed).
_MODEL_SHAPE = ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "ffn_hidden", "tie_embeddings")
_ATTENTION_SHAPE = ("attention", "head_dim_override", "qk_norm", "qkv_bias")
_MLA_SHAPE = ("q_lora_rank", "kv_lora_rank", "qk_rope_head_dim", "qk_nope_head_dim", "v_head_dim")
SHAPE_FIELDS = {
    "model": (*_MODEL_SHAPE, *_ATTENTION_SHAPE, *_MLA_SHAPE, "first_dense_layers", "moe_every", "mtp_layers"),
    "moe": ("num_experts", "expert_hidden", "num_shared_experts", "shared_expert_hidden", "shared_expert_gate"),
}


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message is one line naming the field, the path and the rule."""


Verifier = Callable[[Path, dict, str], None]
"""Checks a checkpoint's files against its meta.json (path, meta, field); raises CheckpointError."""


# --- finding checkpoints ------------------------------------------------------------------------------------


def checkpoint_root(run_dir: str | Path) -> Path:
    return Path(run_dir) / CHECKPOINTS


def complete_checkpoints(root: Path) -> list[tuple[int, Path]]:
    """(save sequence number, path) of every complete checkpoint under `root` whose meta.json names its
    sequence number, oldest save first (an unreadable one is listed by `unreadable_checkpoints`)."""
    found = []
    for path in _sealed_dirs(root):
        try:
            found.append((int(json.loads((path / "meta.json").read_text())["seq"]), path))
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return sorted(found)


def _sealed_dirs(root: Path) -> list[Path]:
    if not root.is_dir():
        return []
    return [p for p in root.iterdir() if _STEP_DIR.match(p.name) and (p / "COMPLETE").is_file()]


def verify_checksums(path: Path, meta: dict, field: str, share: tuple[int, int] = (0, 1)) -> None:
    """Reads the checkpoint's files and compares each with the checksum meta.json records; raises
    CheckpointError at the first that differs. share=(i, n): only every n-th file from the i-th (the
    caller's part when n processes split the reading)."""
    if meta.get("format") == 1:
        return  # saved before checksums: its files were checked by size only
    checksums = meta.get("checksums")
    if not isinstance(checksums, dict):
        raise CheckpointError(
            f"{field}={path}: meta.json has no checksums (rule: checkpoint files must be complete and unaltered)"
        )
    index, count = share
    problem = first_mismatch(path, checksums, sorted(meta["files"])[index::count])
    if problem:
        raise CheckpointError(f"{field}={path}: {problem} (rule: checkpoint files must be complete and unaltered)")


def latest_usable(
    root: Path, field: str, on_skip: Callable[[str], None], verify: Verifier | None
) -> tuple[Path, dict] | None:
    """The newest complete checkpoint under `root` that reads back and passes `verify`, with its meta.json;
    every sealed checkpoint passed over (unreadable meta.json, missing, truncated or altered files) is
    reported to `on_skip`."""
    ordered = [path for _, path in complete_checkpoints(root)]
    for path in sorted(set(_sealed_dirs(root)) - set(ordered)):
        on_skip(f"{field}=auto skipped {path}: meta.json is missing or corrupt (its save order is unknown)")
    for path in reversed(ordered):
        try:
            return path, _checked(path, field, verify)
        except CheckpointError as err:
            on_skip(f"{field}=auto skipped {path}: {err}")
    return None


def _stderr(line: str) -> None:
    print(f"moeyard: {line}", file=sys.stderr, flush=True)


def resolve(
    spec: str | None,
    run_dir: str | Path,
    field: str,
    on_skip: Callable[[str], None] = _stderr,
    verify: Verifier | None = verify_checksums,
) -> tuple[Path, dict] | None:
    """The checkpoint `spec` names and its meta.json (read once): none, auto (the newest usable save in the
    run, if any, saying which newer ones it skipped and why) or a path.

    A path may be a step_N directory, a run directory or its checkpoints/ directory (then its latest save).
    verify: how file contents are checked against their checksums (default: `verify_checksums`, every file in
    this process; None skips it, for a caller whose ranks verify before loading).
    """
    if spec in (None, "", "none"):
        return None
    if spec == "auto":
        return latest_usable(checkpoint_root(run_dir), field, on_skip, verify)
    path = Path(spec)
    if (path / "COMPLETE").is_file() and not path.name.endswith(".tmp"):  # .tmp: a save never sealed
        return path, _checked(path, field, verify)
    for root in (checkpoint_root(path), path):
        found = complete_checkpoints(root)
        if found:
            return found[-1][1], _checked(found[-1][1], field, verify)
    if (path / "meta.json").exists() or (path / ".metadata").exists() or path.name.endswith(".tmp"):
        raise CheckpointError(
            f"{field}={spec} is an incomplete checkpoint: it has no COMPLETE marker "
            "(rule: its save was interrupted; use an earlier step_N)"
        )
    raise CheckpointError(
        f"{field}={spec} holds no complete checkpoint (rule: give a step_N directory with "
        "a COMPLETE marker, or a run directory that has one)"
    )


def read_meta(path: Path, field: str) -> dict:
    """meta.json of a complete checkpoint, after checking every file it lists has the recorded size, with
    DCP's parsed .metadata under DCP_METADATA (so that a load does not read it again)."""
    try:
        meta = json.loads((path / "meta.json").read_text())
        files, step = dict(meta["files"]), int(meta["step"])
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise CheckpointError(
            f"{field}={path}: meta.json is missing or corrupt ({type(err).__name__}) "
            "(rule: a checkpoint is a step_N directory written by moeyard)"
        ) from None
    if meta.get("format") not in READS:
        raise CheckpointError(f"{field}={path}: format={meta.get('format')} (rule: this moeyard reads formats {READS})")
    for name, size in files.items():
        actual = (path / name).stat().st_size if (path / name).is_file() else None
        if actual != size:
            raise CheckpointError(
                f"{field}={path}: {name} has {actual} bytes, meta.json records {size} "
                "(rule: checkpoint files must be complete and unaltered)"
            )
    try:
        meta[DCP_METADATA] = SafeFileSystemReader(path).read_metadata()
    except Exception as err:
        raise CheckpointError(
            f"{field}={path}: .metadata is unreadable ({first_error_line(err)}) "
            "(rule: checkpoint files must be complete and unaltered)"
        ) from None
    meta["step"] = step
    return meta


def _checked(path: Path, field: str, verify: Verifier | None) -> dict:
    meta = read_meta(path, field)
    if verify is not None:
        verify(path, meta, field)
    return meta


def check_compatible(meta: dict, model: ModelConfig, moe: MoEConfig, field: str, path: Path) -> None:
    """Raises CheckpointError naming the first shape field where the checkpoint and the config differ."""
    for section, names in SHAPE_FIELDS.items():
        cls = ModelConfig if section == "model" else MoEConfig
        ours, default = asdict(model if section == "model" else moe), asdict(cls())
        for name in names:
            saved = meta.get(section, {}).get(name, default[name])
            if saved != ours[name]:
                raise CheckpointError(
                    f"{field}={path}: the checkpoint has {section}.{name}={saved}, this config "
                    f"{ours[name]} (rule: a checkpoint loads only into the same model shape)"
                )


# --- the layout-free state dict --------------------------------------------------------------------------


def model_tensors(pm) -> list[tuple[str, torch.Tensor]]:
    """This rank's parameters and aux-free expert biases, by full-model FQN."""
    named = list(pm.named_parameters())
    named += [(f"layers.{lid}.moe.router.expert_bias", moe.router.expert_bias) for lid, moe in pm.moe_layers().items()]
    return named


def init_optimizer_state(optimizer: torch.optim.Optimizer) -> None:
    """Creates AdamW's zero state (as its first step would) so a load has tensors to fill."""
    if isinstance(optimizer, Muon):  # its momentum buffers; its AdamW's moments below, in the shared state
        optimizer.init_state()
        optimizer = optimizer.adamw
    assert isinstance(optimizer, torch.optim.AdamW), type(optimizer)
    for group in optimizer.param_groups:
        on_device = group["fused"] or group["capturable"]
        for p in group["params"]:
            if optimizer.state.get(p):
                continue
            state = {
                "step": torch.zeros((), dtype=torch.float32, device=p.device if on_device else "cpu"),
                "exp_avg": torch.zeros_like(p, memory_format=torch.preserve_format),
                "exp_avg_sq": torch.zeros_like(p, memory_format=torch.preserve_format),
            }
            if group["amsgrad"]:
                state["max_exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            optimizer.state[p] = state


def rng_states(kinds: tuple[str, ...] = ("cpu", "cuda")) -> dict[str, torch.Tensor]:
    """This process's RNG states by device kind (CUDA only once CUDA is in use)."""
    states = {"cpu": torch.get_rng_state()} if "cpu" in kinds else {}
    if "cuda" in kinds and torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state()
    return states


def set_rng_states(states: dict[str, torch.Tensor]) -> None:
    for kind, state in states.items():
        (torch.set_rng_state if kind == "cpu" else torch.cuda.set_rng_state)(state)


def build_state(
    pm, optimizer: torch.optim.Optimizer | None, rank: int, rng: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """The flat DCP state dict of this rank: views of its shards, so a load fills them in place."""
    named = model_tensors(pm)
    state = {f"model.{name}": layout_free(name, t, pm.dims, pm.expert_mesh) for name, t in named}
    if isinstance(optimizer, ZeroAdamW):  # dp_mode=zero1 or bf16 parameters: slices, named as replicate's
        state.update(optimizer.layout_free_state())
    elif optimizer is not None:
        name_of = {id(p): name for name, p in named}
        for group in optimizer.param_groups:
            for p in group["params"]:
                for key, value in optimizer.state[p].items():
                    state[f"optim.{name_of[id(p)]}.{key}"] = layout_free(name_of[id(p)], value, pm.dims, pm.expert_mesh)
    for kind, value in rng.items():  # per rank: each rank has its own streams
        state[f"rng.rank{rank}.{kind}"] = value
    return state


# --- save and load ------------------------------------------------------------------------------------------


@contextmanager
def single_process_quiet() -> Iterator[None]:
    """Silences DCP's notice that it runs without a process group (meant: one process)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _write_synced(path: Path, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def remove_checkpoint(path: Path) -> None:
    """Deletes a checkpoint so that no crash leaves it looking complete: the marker goes first."""
    (path / "COMPLETE").unlink(missing_ok=True)
    shutil.rmtree(path, ignore_errors=True)


def remove_stale(root: Path) -> None:
    """Removes leftovers of interrupted saves (rank 0, while no save is running)."""
    if root.is_dir():
        for path in root.glob("step_*.tmp"):
            shutil.rmtree(path, ignore_errors=True)


@dataclass
class PendingSave:
    """A save whose tensors are being written into `tmp` (in a background thread for an async save);
    `finish_save` seals it once every rank's write has finished."""

    step: int
    tmp: Path
    final: Path
    meta: dict
    """What meta.json records (the caller's meta, the step, whether optimizer state and which RNGs are in)."""
    written: Future
    """Resolves (to DCP's Metadata) once this rank's files are on disk; raises if the write failed."""
    checksums: dict[str, int]
    """CRC-32C of each file this rank wrote, by name: filled in as the write finishes each file."""


def start_save(
    pm,
    optimizer,
    step: int,
    root: Path,
    meta: dict,
    *,
    stager: HostStager | None = None,
    process_group: dist.ProcessGroup | None = None,
) -> PendingSave:
    """Starts writing step_N into step_N.tmp on every rank (a collective); `finish_save` seals it.

    stager: write in the background (`dcp.async_save`): `stager` first copies this rank's shards into its
    host buffers (so training may go on changing them), then a thread writes the copies and this returns at
    once. The stager is not staged into again before `finish_save` has waited for this write. That thread
    runs DCP's own collectives, so `process_group` should be one that nothing else uses meanwhile (a gloo
    group of all ranks).
    """
    rank = dist.get_rank() if dist.is_initialized() else 0
    final, tmp = root / f"step_{step}", root / f"step_{step}.tmp"
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        remove_stale(root)
        tmp.mkdir()
    _barrier()
    rng = rng_states()
    state = build_state(pm, optimizer, rank, rng)
    meta = {**meta, "step": step, "optimizer": optimizer is not None, "rng": sorted(rng)}
    writer = ChecksumWriter(tmp, single_file_per_rank=True, sync_files=True)
    no_dist = not dist.is_initialized()
    background = stager is not None
    if background and no_dist:
        # DCP's writer thread warns after single_process_quiet has returned; in one process it always would.
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
    try:
        with single_process_quiet():
            if background:
                writer.per_thread_copy_ahead = 0  # as the writer's own staging sets it: the data is on the host
                written = dcp.async_save(
                    state, storage_writer=writer, process_group=process_group, no_dist=no_dist, async_stager=stager
                )
                stager.writing = written
            else:
                written = Future()
                written.set_result(dcp.save(state, storage_writer=writer, no_dist=no_dist))
    except BaseException:
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    assert isinstance(written, Future), type(written)  # HostStager stages synchronously
    return PendingSave(step=step, tmp=tmp, final=final, meta=meta, written=written, checksums=writer.checksums)


def finish_save(
    pending: PendingSave,
    keep: int,
    on_written: Callable[[Path], None] | None = None,
    before_seal: Callable[[Path], None] | None = None,
) -> Path:
    """Waits for this rank's write, then (once every rank's has finished) rank 0 seals the save and keeps
    the newest `keep` saves of its lineage (meta["lineage"]; a collective). Returns the sealed step_N.

    `on_written(tmp)` runs on every rank once its files are in the unsealed directory; `before_seal(tmp)` on
    rank 0 once every rank's are, before meta.json.
    """
    rank = dist.get_rank() if dist.is_initialized() else 0
    tmp, root = pending.tmp, pending.tmp.parent
    try:
        pending.written.result()
        if on_written is not None:
            on_written(tmp)
        checksums = _gather_checksums(pending.checksums)  # also the barrier: every rank's files are written
        if rank == 0:
            if before_seal is not None:
                before_seal(tmp)
            _seal(tmp, pending.final, root, pending.meta, checksums)
            for old in own_checkpoints(root, pending.meta.get("lineage"))[:-keep]:
                remove_checkpoint(old)
    except BaseException:
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    _barrier()
    return pending.final


def save(
    pm,
    optimizer,
    step: int,
    root: Path,
    keep: int,
    meta: dict,
    on_written: Callable[[Path], None] | None = None,
    before_seal: Callable[[Path], None] | None = None,
) -> Path:
    """Writes step_N atomically on every rank (a collective), then keeps the newest `keep` saves.

    `meta` (JSON) is stored beside the tensors; `on_written` and `before_seal` as in `finish_save`.
    """
    return finish_save(start_save(pm, optimizer, step, root, meta), keep, on_written, before_seal)


def _gather_checksums(mine: dict[str, int]) -> dict[str, int]:
    """Every rank's file checksums, merged, on rank 0 (a collective over all ranks; {} elsewhere)."""
    if not dist.is_initialized():
        return dict(mine)
    rank = dist.get_rank()
    gathered: list[dict[str, int] | None] = [None] * dist.get_world_size() if rank == 0 else None
    dist.gather_object(dict(mine), gathered, dst=0)
    return {name: crc for part in gathered or () for name, crc in part.items()}


def own_checkpoints(root: Path, lineage: str | None) -> list[Path]:
    """Complete checkpoints under `root` saved by runs of `lineage`, oldest save first."""
    return [path for _, path in complete_checkpoints(root) if _lineage(path) == lineage]


def _lineage(path: Path) -> str | None:
    try:
        return json.loads((path / "meta.json").read_text()).get("lineage")
    except (OSError, ValueError, AttributeError):
        return None


def _seal(tmp: Path, final: Path, root: Path, meta: dict, checksums: dict[str, int]) -> None:
    """meta.json, then COMPLETE, then the rename: only a fully written directory ever becomes step_N.

    `checksums`: what the ranks computed while writing; a file written another way (a before_seal
    callback's) is read back for its checksum here.
    """
    found = complete_checkpoints(root)
    names = [p.name for p in sorted(tmp.iterdir()) if p.is_file()]
    meta = {
        "format": FORMAT,
        **meta,
        "seq": found[-1][0] + 1 if found else 1,
        "files": {name: (tmp / name).stat().st_size for name in names},
        "checksum": ALGORITHM,
        "checksums": {name: checksums[name] if name in checksums else file_checksum(tmp / name) for name in names},
    }
    _write_synced(tmp / "meta.json", json.dumps(meta, indent=1))
    _write_synced(tmp / "COMPLETE", f"step {meta['step']}\n")
    _fsync_dir(tmp)
    if final.exists():  # the same step saved again (a resumed run passing it): the new save replaces it
        _replace_aside(final, meta.get("lineage"))
    os.replace(tmp, final)
    _fsync_dir(root)


def _replace_aside(final: Path, lineage: str | None) -> None:
    """Clears the way for a save of step_N: our own lineage's old step_N is deleted; another run's is
    renamed step_N.other-<seq> (never taken for a checkpoint, never deleted by us)."""
    if _lineage(final) == lineage:
        remove_checkpoint(final)
        return
    n = 1
    while final.with_name(f"{final.name}.other-{n}").exists():
        n += 1
    os.replace(final, final.with_name(f"{final.name}.other-{n}"))


def load(pm, optimizer, path: Path, meta: dict, field: str, *, weights_only: bool = False) -> None:
    """Loads a checkpoint saved under any layout into this rank's shards (a collective).

    `meta` is the checkpoint's meta.json as `resolve` read it (with its parsed .metadata, not read again).
    Each rank reads only the saved chunks that overlap its own shards, straight into them. weights_only:
    parameters and expert biases only (the optimizer and RNG start fresh).
    """
    rank = dist.get_rank() if dist.is_initialized() else 0
    world = dist.get_world_size() if dist.is_initialized() else 1
    with_optim = optimizer is not None and not weights_only and meta.get("optimizer", False)
    if with_optim:
        init_optimizer_state(optimizer)
    # RNG streams belong to ranks: restored only when the world size is the one saved.
    same_world = not weights_only and meta.get("world_size") == world
    rng = rng_states(tuple(meta.get("rng", ()))) if same_world else {}
    state = build_state(pm, optimizer if with_optim else None, rank, rng)
    reader = SafeFileSystemReader(path, metadata=meta.get(DCP_METADATA))
    try:
        with single_process_quiet():
            dcp.load(state, storage_reader=reader, no_dist=not dist.is_initialized())
    except Exception as err:
        raise CheckpointError(
            f"{field}={path} could not be read: {first_error_line(err)} "
            "(rule: the checkpoint must be complete and match the model)"
        ) from None
    if with_optim and isinstance(optimizer, ZeroAdamW):  # bf16 parameters from the loaded fp32 masters
        optimizer.params_from_masters()
    set_rng_states({kind: state[f"rng.rank{rank}.{kind}"] for kind in rng})


def first_error_line(err: BaseException) -> str:
    """A one-line summary of an error, looking inside DCP's per-rank CheckpointException."""
    failures = getattr(err, "failures", None)
    if failures:
        inner = next(iter(failures.values()))
        err = getattr(inner, "exception", inner)
    text = (str(err).strip().splitlines() or [""])[0]
    return f"{type(err).__name__}: {text}"[:300]
