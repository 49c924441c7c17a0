"""Regenerate kvjax/serve/data/traces/ from the public trace files (../shared/traces by default).

    python scripts/bundle_traces.py [--src ../shared/traces] [--check]

Each trace is loaded with kvjax.serve.traces (arrival order, prefix forest from hash_ids) and
saved as a compressed .npz (save_trace: float64 arrival seconds, int32 lengths and prefix
segments; no raw hash_ids - a request's blocks are its segment path). The licence texts and
the upstream READMEs (attribution) are copied beside the data. --check only verifies that the
bundled files load and match the sources' statistics.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from kvjax.serve import traces  # noqa: E402

DEST = ROOT / "kvjax" / "serve" / "data" / "traces"
SOURCES = {  # bundled name -> source file in --src
    "azure-conv": "azure2023_conv.csv",
    "azure-code": "azure2023_code.csv",
    "mooncake-conv": "mooncake_conversation.jsonl",
    "mooncake-synthetic": "mooncake_synthetic.jsonl",
}
COPIED = ("LICENSE-azure-CC-BY-4.0.txt", "LICENSE-mooncake-Apache-2.0.txt",
          "azure2023_README.md", "mooncake_README.md")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--src", default=str(ROOT.parent / "shared" / "traces"))
    p.add_argument("--check", action="store_true", help="compare, do not write")
    args = p.parse_args(argv)
    src = Path(args.src)
    DEST.mkdir(parents=True, exist_ok=True)
    total = 0
    for name, fname in SOURCES.items():
        tr = traces.load_trace(src / fname, name=name)
        out = DEST / f"{traces.BUNDLED[name][0]}.npz"
        if not args.check:
            traces.save_trace(tr, out)
        back = traces.load_trace(name)
        assert traces.trace_stats(back) == traces.trace_stats(tr), name
        size = out.stat().st_size
        total += size
        print(f"{name:<20} {fname:<30} {tr.num_requests:>6,} requests -> {out.name} "
              f"({size / 1024:,.0f} KiB)")
    for fname in COPIED:
        if not args.check:
            shutil.copyfile(src / fname, DEST / fname)
        total += (DEST / fname).stat().st_size
    print(f"total {total / 1024:,.0f} KiB in {DEST.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
