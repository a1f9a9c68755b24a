"""Sharding, declared once: logical axis names map to mesh axes.

Model and engine code name logical axes (`batch`, `sequence`, `kv_slots`, ...); only this module and the
per-shard context name the mesh axes `cp` and `tp`, and `make_mesh` here is the one place a mesh is built. Prompt tokens (in zigzag order) and KV-cache slots are
split over `cp`; heads (of the KV cache and the GDN states) and conv channels over `tp`; the weights' split
is in pcp_jax/parallel/tensor.py; everything else (logits of one position, token ids) is replicated.
"""

from __future__ import annotations

import dataclasses
import numbers

import numpy as np
from jax.sharding import Mesh, PartitionSpec

CP_AXIS = "cp"
TP_AXIS = "tp"


@dataclasses.dataclass(frozen=True)
class ShardingRules:
    batch: str | None = None
    sequence: str | None = CP_AXIS   # prompt tokens, zigzag order
    kv_slots: str | None = CP_AXIS   # slots of the KV cache of full-attention layers
    layers: str | None = None        # the leading axis of stacked caches (one entry per layer of a kind)
    heads: str | None = TP_AXIS      # KV heads of the cache, value heads of GDN states
    channels: str | None = TP_AXIS   # GDN conv channels (rank-major [q | k | v] blocks: parallel/tensor.py)
    vocab: str | None = None

    def spec(self, *logical: str | None) -> PartitionSpec:
        """PartitionSpec for an array whose dimensions carry these logical names (None: replicated).
        Raises ValueError if two dimensions would be split over the same mesh axis."""
        mesh_axes = []
        for name in logical:
            if name is not None and not hasattr(self, name):
                raise ValueError(f"unknown logical axis {name!r}; known: {[f.name for f in dataclasses.fields(self)]}")
            mesh_axes.append(None if name is None else getattr(self, name))
        used = [a for a in mesh_axes if a is not None]
        if len(used) != len(set(used)):
            raise ValueError(f"logical axes {logical} put two dimensions on one mesh axis: {mesh_axes}")
        return PartitionSpec(*mesh_axes)


RULES = ShardingRules()
REPLICATED = PartitionSpec()
TOKENS = RULES.spec("batch", "sequence")     # [B, N] prompt ids, [B, N, V] logits
KV_SLOTS = RULES.spec("batch", "kv_slots")   # [B, S] slot positions
STACKED_KV = RULES.spec("layers", "batch", "kv_slots", "heads")   # [n_attention, B, S, Hkv, hd] K/V of every attention layer
CONV = RULES.spec("layers", "batch", None, "channels")   # [n_gdn, B, K-1, conv_dim]
STATE = RULES.spec("layers", "batch", "heads")           # [n_gdn, B, Hv, dk, dv]
CACHES = {"k": STACKED_KV, "v": STACKED_KV, "conv": CONV, "state": STATE}  # model.empty_caches
CAPTURED_CONV = RULES.spec("layers", None, "batch", None, "channels")   # [n_gdn, P, B, K-1, conv_dim]
CAPTURED_STATE = RULES.spec("layers", None, "batch", "heads")           # [n_gdn, P, B, Hv, dk, dv]


def _positive(name: str, value) -> None:
    if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name}={value!r} must be a positive integer")


def make_mesh(cp: int | None = None, tp: int = 1, devices=None) -> Mesh:
    """A mesh with axes ("cp", "tp") of cp·tp devices; the `tp` ranks of one `cp` rank are consecutive devices
    (on one host, the closest ones). `devices`: the devices to take them from, in order (default: every device
    of every process). `cp=None`: as many as the devices allow (len(devices) // tp).

    With several processes the mesh takes an equal share of cp·tp / process_count devices from each process,
    in process order, so ring neighbours and the `tp` ranks of one `cp` rank sit on one host wherever they
    can; a share that does not divide evenly, or a process with too few devices, is refused by name."""
    import jax

    _positive("tp", tp)
    if cp is not None:
        _positive("cp", cp)
    given = devices is not None
    devices = list(jax.devices() if devices is None else devices)
    if len({d.id for d in devices}) != len(devices):
        raise ValueError(f"the devices of a mesh must be distinct; got ids {[d.id for d in devices]}")
    by_process: dict[int, list] = {}
    for d in (devices if given else sorted(devices, key=lambda d: (d.process_index, d.id))):
        by_process.setdefault(d.process_index, []).append(d)
    n_proc = len(by_process)
    where = (f"{len(devices)} {devices[0].platform} device(s) over {n_proc} process(es)" if n_proc > 1
             else f"{len(devices)} {devices[0].platform} device(s) are visible")
    flags = lambda c: f"cp={c}" if tp == 1 else f"cp={c} x tp={tp}"
    if cp is None:
        if tp > len(devices):
            raise ValueError(f"tp={tp} needs {tp} devices but {where}")
        cp = len(devices) // tp
    total = cp * tp
    if total > len(devices):
        raise ValueError(f"{flags(cp)} needs {total} devices but {where}")
    if n_proc == 1:
        chosen = list(by_process.values())[0][:total]
    else:
        if total % n_proc:
            raise ValueError(f"{flags(cp)} must be a multiple of the number of processes ({n_proc}) so that every "
                             f"process holds an equal share; {where}")
        per = total // n_proc
        short = [p for p, ds in sorted(by_process.items()) if len(ds) < per]
        if short:
            raise ValueError(f"{flags(cp)} needs {per} device(s) on every process but process {short[0]} has "
                             f"{len(by_process[short[0]])}; {where}")
        chosen = [d for p in sorted(by_process) for d in by_process[p][:per]]
    return Mesh(np.asarray(chosen).reshape(cp, tp), (CP_AXIS, TP_AXIS))


def with_tp_axis(mesh: Mesh) -> Mesh:
    """A user's mesh in our form: axes ("cp",) gain a `tp` axis of size 1 (same devices); ("cp", "tp") is kept.
    Any other axes, or a device named twice, is refused by name."""
    ids = [d.id for d in mesh.devices.flat]
    if len(set(ids)) != len(ids):
        raise ValueError(f"the mesh names a device twice (device ids {ids}); each device may appear once")
    if mesh.axis_names == (CP_AXIS, TP_AXIS):
        return mesh
    if mesh.axis_names != (CP_AXIS,):
        raise ValueError(f"mesh axes {mesh.axis_names}; expected ({CP_AXIS!r},) or ({CP_AXIS!r}, {TP_AXIS!r})")
    return Mesh(mesh.devices.reshape(-1, 1), (CP_AXIS, TP_AXIS))
