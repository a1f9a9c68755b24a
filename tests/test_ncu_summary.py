"""scripts/ncu_kernels.py's table from Nsight Compute's CSV (`ncu --csv --page details`), on rows as ncu 2025.3
wrote them on an H200 (run K12, trimmed): units scaled (ns, byte, %), thousands separators, ncu's own
==PROF== lines and the script's prints skipped, kernels in launch order."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import ncu_kernels  # noqa: E402

HEAD = ('"ID","Process ID","Process Name","Host Name","Kernel Name","Context","Stream","Block Size","Grid Size",'
        '"Device","CC","Section Name","Metric Name","Metric Unit","Metric Value","Rule Name","Rule Type",'
        '"Rule Description","Estimated Speedup Type","Estimated Speedup"')


def row(kid, name, section, metric, unit, value):
    return (f'"{kid}","1260","python3.12","127.0.0.1","{name}","1","14","(128, 1, 1)","(1, 64, 2)","0","9.0",'
            f'"{section}","{metric}","{unit}","{value}",')


def test_summary_table_from_ncu_csv(tmp_path):
    lines = ["==PROF== Connected to process 1260 (/usr/bin/python3.12)", "== gdn ours: warm calls next", HEAD,
             row(6, "gdn_state_output", "Command line profiler metrics", "dram__bytes_read.sum", "byte",
                 "1,098,091,264"),
             row(6, "gdn_state_output", "Command line profiler metrics", "gpu__time_duration.sum", "ns", "1,826,208"),
             row(6, "gdn_state_output", "GPU Speed Of Light Throughput", "DRAM Throughput", "%", "18.51"),
             row(6, "gdn_state_output", "Launch Statistics", "Registers Per Thread", "register/thread", "255"),
             row(6, "gdn_state_output", "Occupancy", "Achieved Occupancy", "%", "6.25"),
             row(5, "gdn_wy_t", "Command line profiler metrics", "gpu__time_duration.sum", "us", "1,010.5"),
             row(5, "gdn_wy_t", "Launch Statistics", "Block Limit Registers", "block", "n/a")]
    path = tmp_path / "ncu.csv"
    path.write_text("\n".join(lines) + "\n")
    table = ncu_kernels.summarize(str(path)).splitlines()
    assert table[0].startswith("| # | kernel | grid | block | ms | DRAM read GB |")
    assert len(table) == 4  # header, rule, two kernels
    assert table[2].startswith("| 0 | gdn_wy_t | (1, 64, 2) | (128, 1, 1) | 1.01 | - |")
    assert table[3] == ("| 1 | gdn_state_output | (1, 64, 2) | (128, 1, 1) | 1.83 | 1.1 | - | 18.5 | - | - | 255 | "
                        "6.25 |")
