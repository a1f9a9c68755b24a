"""How much of the collective (NCCL) kernel time on each GPU ran alongside compute kernels, from a JAX
profiler trace (`jax.profiler.start_trace` → `plugins/profile/<run>/*.xplane.pb`).

For each device plane `/device:GPU:i`, kernels are read from its stream lines. A kernel whose name contains
"nccl" is communication; every other kernel is compute. Reported per device: the summed communication
kernel time, the part of it covered by compute kernels on other streams (`overlapped`), and the part not
covered (`exposed`: what the GPU spent only communicating or waiting on a peer). An NCCL kernel's time
includes waiting for its peer, so `exposed` bounds the communication cost from above.
"""

from __future__ import annotations

import glob
import os


def merge_intervals(spans: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Sorted, disjoint union of half-open [start, end) spans."""
    out: list[list[int]] = []
    for s, e in sorted(spans):
        if e <= s:
            continue
        if out and s <= out[-1][1]:
            out[-1][1] = max(out[-1][1], e)
        else:
            out.append([s, e])
    return [(s, e) for s, e in out]


def covered(span: tuple[int, int], union: list[tuple[int, int]]) -> int:
    """Length of `span` inside the disjoint sorted `union`."""
    s, e = span
    return sum(max(0, min(e, b) - max(s, a)) for a, b in union if a < e and b > s)


def overlap_summary(kernels: list[tuple[str, int, int]]) -> dict:
    """kernels: (name, start_ns, end_ns) of one device. Returns the communication/compute split."""
    comm = [(s, e) for n, s, e in kernels if "nccl" in n.lower()]
    compute = merge_intervals([(s, e) for n, s, e in kernels if "nccl" not in n.lower()])
    comm_union = merge_intervals(comm)
    total = sum(e - s for s, e in comm_union)
    over = sum(covered(span, compute) for span in comm_union)
    busy = merge_intervals(comm_union + compute)
    return {"comm_kernels": len(comm), "comm_ns": total, "overlapped_ns": over, "exposed_ns": total - over,
            "compute_ns": sum(e - s for s, e in compute),
            "span_ns": (busy[-1][1] - busy[0][0]) if busy else 0}


def device_kernels(xplane_path: str) -> dict[str, list[tuple[str, int, int]]]:
    """Per GPU plane: the kernels on its stream lines (derived lines such as "XLA Ops" are skipped)."""
    import jax
    data = jax.profiler.ProfileData.from_file(xplane_path)
    out = {}
    for plane in data.planes:
        if not plane.name.startswith("/device:GPU"):
            continue
        ks = []
        for line in plane.lines:
            if "stream" not in line.name.lower():
                continue
            ks += [(ev.name, int(ev.start_ns), int(ev.end_ns)) for ev in line.events]
        out[plane.name] = ks
    return out


def latest_xplane(log_dir: str) -> str:
    files = sorted(glob.glob(os.path.join(log_dir, "plugins", "profile", "*", "*.xplane.pb")), key=os.path.getmtime)
    if not files:
        raise FileNotFoundError(f"no *.xplane.pb under {log_dir}/plugins/profile")
    return files[-1]


def report(log_dir: str) -> str:
    """A markdown table of `overlap_summary` per GPU of the latest trace in `log_dir`."""
    per_dev = device_kernels(latest_xplane(log_dir))
    if not per_dev:
        return "no GPU device planes in the trace (CPU run?)"
    rows = ["| device | NCCL kernels | NCCL time (ms) | overlapped with compute (ms) | exposed (ms) | "
            "compute kernels (ms) | traced span (ms) |", "|---|---|---|---|---|---|---|"]
    for name, ks in sorted(per_dev.items()):
        s = overlap_summary(ks)
        rows.append(f"| {name} | {s['comm_kernels']} | {s['comm_ns'] / 1e6:.2f} | {s['overlapped_ns'] / 1e6:.2f} | "
                    f"{s['exposed_ns'] / 1e6:.2f} | {s['compute_ns'] / 1e6:.2f} | {s['span_ns'] / 1e6:.2f} |")
    return "\n".join(rows)
