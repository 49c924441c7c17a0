"""Regenerate kv-serve-v0's bundled calibration data from the team's shared/ folder.

    python scripts/derive_serve_data.py ../shared

Writes kvjax/serve/data/vidur_h100_llama2_7b_linear_ops.csv: per batch size, the milliseconds
of one iteration's linear ops (Vidur's per-layer medians of the nine linear ops, summed, x 32
layers; median over repeated rows; tensor parallel 1) from vidur_h100_llama2-7b_mlp.csv (MIT,
Microsoft Vidur). Prints the Azure 2023 percentile tables and dispersion fits that
kvjax/serve/workload.py holds.
"""

from __future__ import annotations

import csv
import datetime
import sys
from pathlib import Path

import numpy as np

from kvjax.serve.latency import read_vidur_linear_ops

OUT = Path(__file__).resolve().parents[1] / "kvjax" / "serve" / "data"


def main(shared: Path) -> None:
    table = read_vidur_linear_ops(shared / "calibration" / "vidur_h100_llama2-7b_mlp.csv")
    with open(OUT / "vidur_h100_llama2_7b_linear_ops.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["num_tokens", "linear_ops_ms"])
        for n, ms in table.items():
            w.writerow([n, f"{ms:.4f}"])
    for name in ("conv", "code"):
        with open(shared / "traces" / f"azure2023_{name}.csv") as f:
            rows = list(csv.reader(f))[1:]
        ts = np.array([datetime.datetime.fromisoformat(r[0][:26]).timestamp() for r in rows])
        ts -= ts[0]
        counts = np.bincount(ts.astype(int))
        print(name, "rate", len(ts) / ts[-1], "per-second var/mean", counts.var() / counts.mean())
        for col in (1, 2):
            v = np.array([int(r[col]) for r in rows])
            print(" ", [int(round(x)) for x in np.percentile(v, np.arange(101))])


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "../shared"))
