"""Request traces for kv-serve-v0: loaders for public trace formats, prefix preprocessing, the
bundled traces and their statistics (NumPy only, outside jit).

    trace = load_trace("mooncake-conv")          # a bundled trace (kvjax/serve/data/traces)
    trace = load_trace("AzureLLMInferenceTrace_conv_1week.csv")   # a file, format detected
    trace_stats(trace)                           # rate, burstiness, percentiles, prefix reuse

Formats (docs/serving.md, "Traces"; detected from the header / first line):

- `azure` - Azure LLM inference 2023 and 2024 CSV: TIMESTAMP (a date-time; a UTC offset is
  applied), ContextTokens, GeneratedTokens.
- `burstgpt` - BurstGPT CSV: Timestamp (seconds), Session ID, Elapsed time, Model, Request
  tokens, Response tokens, Total tokens, Log Type (Session ID, Elapsed time, Model, Total tokens
  and Log Type may be absent). Requests of one session are chained (parent = the previous one).
- `mooncake` - Mooncake JSONL: timestamp (ms), input_length, output_length, hash_ids (prefix
  blocks of 512 tokens).
- `bailian` - Qwen-Bailian JSONL: chat_id, parent_chat_id (-1 or absent: none), timestamp
  (seconds), input_length, output_length, type, turn, hash_ids (blocks of 16 tokens).
- `npz` - a trace saved by `save_trace` (what the bundled traces are).

Every loader returns a `Trace` (requests in arrival order, arrival seconds from the first
request, stable for ties) and raises ValueError naming the file, the line and the column or
field of the first malformed value.

Prefix forest (hash-id traces): the block sequences of all requests form a trie; its nodes are
merged into segments - maximal chains that no request branches off or ends inside - so every
request's blocks are a path of whole segments from a root (`node_parent`, `node_blocks`).
Request i's `node` is the segment its path ends in; `prefix_node` is the deepest segment that
an earlier request also went through (the longest prefix of its hash_ids seen before; -1 none)
and `prefix_tokens` = matched blocks x block size, capped at its input length. Because a match
ends where the earlier path ended or branched, it always ends at a segment boundary. With an
infinite cache, request i hits exactly `prefix_tokens[i]` tokens; `prefix_reuse` sums them.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import warnings
from importlib import resources
from pathlib import Path

import numpy as np

FORMATS = ("azure", "burstgpt", "mooncake", "bailian", "npz")
BLOCK_SIZE = {"mooncake": 512, "bailian": 16}
INT32_MAX = 2**31 - 1
NPZ_VERSION = 1

# Bundled traces: name -> (file stem, description, source, licence).
BUNDLED = {
    "azure-conv": (
        "azure2023_conv",
        "Azure LLM inference trace 2023, conversation",
        "AzureLLMInferenceTrace_conv.csv (Azure/AzurePublicDataset)",
        "CC-BY-4.0",
    ),
    "azure-code": (
        "azure2023_code",
        "Azure LLM inference trace 2023, code",
        "AzureLLMInferenceTrace_code.csv (Azure/AzurePublicDataset)",
        "CC-BY-4.0",
    ),
    "mooncake-conv": (
        "mooncake_conversation",
        "Mooncake FAST'25 conversation trace",
        "traces/conversation_trace.jsonl (kvcache-ai/Mooncake)",
        "Apache-2.0",
    ),
    "mooncake-synthetic": (
        "mooncake_synthetic",
        "Mooncake FAST'25 synthetic trace",
        "traces/synthetic_trace.jsonl (kvcache-ai/Mooncake)",
        "Apache-2.0",
    ),
}
TRACE_NAMES = tuple(BUNDLED)

_PER_REQUEST = (
    "arrival",
    "input_len",
    "output_len",
    "session",
    "parent",
    "turn",
    "category",
    "prefix_node",
    "prefix_tokens",
    "node",
)


@dataclasses.dataclass(frozen=True, eq=False)
class Trace:
    """One request trace as NumPy columns, requests in arrival order.

    Per request ([n]): `arrival` (float64 seconds, the first request at 0), `input_len`,
    `output_len` (int32 tokens), `session` (dense session id, -1 none), `parent` (index of the
    previous request of its conversation, -1 none), `turn` (-1 unknown), `category` (index into
    `categories`, -1 none), and for hash-id traces (`block_size` > 0; else -1 / 0):
    `prefix_node`, `prefix_tokens`, `node`. Per segment ([num_nodes]): `node_parent` (-1 for a
    root), `node_blocks` (blocks in the segment, >= 1). The arrays are not copied: treat them
    as read-only.
    """

    name: str
    format: str
    arrival: np.ndarray
    input_len: np.ndarray
    output_len: np.ndarray
    session: np.ndarray
    parent: np.ndarray
    turn: np.ndarray
    category: np.ndarray
    categories: tuple[str, ...]
    block_size: int
    prefix_node: np.ndarray
    prefix_tokens: np.ndarray
    node: np.ndarray
    node_parent: np.ndarray
    node_blocks: np.ndarray

    @property
    def num_requests(self) -> int:
        return int(self.arrival.shape[0])

    def __len__(self) -> int:
        return self.num_requests

    @property
    def duration(self) -> float:
        """Seconds from the first to the last arrival."""
        return float(self.arrival[-1] - self.arrival[0]) if self.num_requests else 0.0

    @property
    def has_prefixes(self) -> bool:
        return self.block_size > 0

    @property
    def num_nodes(self) -> int:
        return int(self.node_parent.shape[0])

    def node_depth(self) -> np.ndarray:
        """Blocks from the root to the end of each segment ([num_nodes] int64)."""
        depth = self.node_blocks.astype(np.int64)
        up = self.node_parent.astype(np.int64)
        while (up >= 0).any():  # pointer jumping: O(log height) vector passes
            has = up >= 0
            depth = depth + np.where(has, depth[np.maximum(up, 0)], 0)
            up = np.where(has, up[np.maximum(up, 0)], -1)
        return depth

    def segment_path(self, j: int) -> list[int]:
        """Segments from a root down to segment j (empty for j = -1)."""
        out, j = [], int(j)
        while j >= 0:
            out.append(j)
            j = int(self.node_parent[j])
        return out[::-1]

    def path(self, i: int) -> list[int]:
        """Segments of request i's blocks, root first."""
        return self.segment_path(self.node[i])

    def columns(self) -> dict[str, np.ndarray]:
        """The per-request arrays by name (equal length), e.g. to put a trace on a device."""
        return {k: getattr(self, k) for k in _PER_REQUEST}


# -- errors and small parsers --------------------------------------------------------------
def _err(path, line: int | None, field: str | None, msg: str) -> ValueError:
    where = str(path)
    if line is not None:
        where += f": line {line}"
    if field is not None:
        where += f", column {field!r}" if line is not None else f": column {field!r}"
    return ValueError(f"{where}: {msg}")


def _to_int(values: list[str], path, first_line: int, field: str, lo: int = 0) -> np.ndarray:
    """Decimal integer strings -> int64, with the first bad value located."""
    try:
        arr = np.asarray(values, dtype=str).astype(np.int64)
        ok = (arr >= lo) & (arr <= INT32_MAX)
        if ok.all():
            return arr
    except (ValueError, OverflowError):
        pass
    for k, s in enumerate(values):
        try:
            v = int(s)
        except ValueError:
            raise _err(path, first_line + k, field, f"expected an integer, got {s!r}") from None
        if not lo <= v <= INT32_MAX:
            raise _err(
                path, first_line + k, field, f"expected an integer in [{lo}, {INT32_MAX}], got {v}"
            )
    raise AssertionError("unreachable")  # pragma: no cover


def _to_float(values: list[str], path, first_line: int, field: str) -> np.ndarray:
    try:
        arr = np.asarray(values, dtype=str).astype(np.float64)
        if np.isfinite(arr).all():
            return arr
    except ValueError:
        pass
    for k, s in enumerate(values):
        try:
            v = float(s)
        except ValueError:
            raise _err(path, first_line + k, field, f"expected a number, got {s!r}") from None
        if not np.isfinite(v):
            raise _err(path, first_line + k, field, f"expected a finite number, got {s!r}")
    raise AssertionError("unreachable")  # pragma: no cover


def _to_seconds(values: list[str], path, first_line: int, field: str) -> np.ndarray:
    """Date-time strings (ISO-like, optional UTC offset) -> float64 seconds since the epoch."""

    def parse(a):
        with warnings.catch_warnings():  # numpy applies a UTC offset but warns about it
            warnings.simplefilter("ignore")
            return np.asarray(a, dtype=str).astype("datetime64[ns]")

    try:
        t = parse(values)
        if not np.isnat(t).any():
            return t.astype(np.int64) / 1e9
    except ValueError:
        pass
    for k, s in enumerate(values):
        try:
            bad = np.isnat(parse([s]))[0]
        except ValueError:
            bad = True
        if bad:
            raise _err(path, first_line + k, field, f"expected a date-time, got {s!r}")
    raise AssertionError("unreachable")  # pragma: no cover


# -- CSV formats -----------------------------------------------------------------------------
CSV_COLUMNS = {
    # format: (required {key: header}, optional {key: header})
    "azure": ({"time": "TIMESTAMP", "input": "ContextTokens", "output": "GeneratedTokens"}, {}),
    "burstgpt": (
        {"time": "Timestamp", "input": "Request tokens", "output": "Response tokens"},
        {
            "session": "Session ID",
            "model": "Model",
            "log_type": "Log Type",
            "elapsed": "Elapsed time",
            "total": "Total tokens",
        },
    ),
}
_CHUNK = 1 << 19


def _norm(h: str) -> str:
    return " ".join(h.replace("\ufeff", "").strip().lower().replace("_", " ").split())


def _read_csv(path: Path, fmt: str) -> dict[str, np.ndarray | list]:
    required, optional = CSV_COLUMNS[fmt]
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.reader(f)
        try:
            header = next(reader)
        except StopIteration:
            raise _err(path, 1, None, "empty file (expected a header line)") from None
        pos = {_norm(h): k for k, h in enumerate(header)}
        cols = {}
        for key, name in required.items():
            if _norm(name) not in pos:
                raise _err(path, 1, name, f"missing column (header: {header})")
            cols[key] = (pos[_norm(name)], name)
        for key, name in optional.items():
            if _norm(name) in pos:
                cols[key] = (pos[_norm(name)], name)
        width = len(header)
        out: dict[str, list] = {k: [] for k in cols}
        rows: list[list[str]] = []
        first = 2  # the line of rows[0]

        def flush():
            if not rows:
                return
            columns = list(zip(*rows, strict=True))
            for key, (k, name) in cols.items():
                vals = [v.strip() for v in columns[k]] if key == "time" else list(columns[k])
                if key == "time" and fmt == "azure":
                    out[key].append(_to_seconds(vals, path, first, name))
                elif key in ("time", "elapsed"):
                    out[key].append(_to_float(vals, path, first, name))
                elif key in ("input", "output", "total"):
                    out[key].append(_to_int(vals, path, first, name))
                else:
                    out[key].extend(v.strip() for v in vals)
            rows.clear()

        for row in reader:
            if len(row) != width:
                line = reader.line_num
                if not row or (len(row) == 1 and not row[0].strip()):
                    flush()  # a blank line: chunks are runs of consecutive lines
                    first = line + 1
                    continue
                raise _err(
                    path,
                    line,
                    None,
                    f"expected {width} comma-separated fields "
                    f"({', '.join(header)}), got {len(row)}",
                )
            rows.append(row)
            if len(rows) >= _CHUNK:
                flush()
                first = reader.line_num + 1
        flush()
    res: dict = {}
    for key in cols:
        if key in ("session", "model", "log_type"):
            res[key] = out[key]
        else:
            res[key] = np.concatenate(out[key]) if out[key] else np.zeros(0)
    return res


def _dense_ids(values: list[str]) -> tuple[np.ndarray, list[str]]:
    """Strings -> dense ids in order of first appearance ('' -> -1)."""
    ids: dict[str, int] = {}
    out = np.empty(len(values), np.int32)
    for k, v in enumerate(values):
        if v == "":
            out[k] = -1
        else:
            out[k] = ids.setdefault(v, len(ids))
    return out, list(ids)


def _chain_sessions(session: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """parent (previous request of the same session) and turn (1-based) in the given order."""
    n = session.shape[0]
    parent = np.full(n, -1, np.int32)
    turn = np.full(n, -1, np.int32)
    has = np.flatnonzero(session >= 0)
    if has.size:
        order = has[np.argsort(session[has], kind="stable")]
        s = session[order]
        first = np.r_[True, s[1:] != s[:-1]]
        prev = np.r_[-1, order[:-1]]
        parent[order] = np.where(first, -1, prev)
        start = np.maximum.accumulate(np.where(first, np.arange(order.size), 0))
        turn[order] = np.arange(order.size) - start + 1
    return parent, turn


# -- JSONL formats ---------------------------------------------------------------------------
JSONL_FIELDS = {
    "mooncake": ("timestamp", "input_length", "output_length", "hash_ids"),
    "bailian": (
        "chat_id",
        "parent_chat_id",
        "timestamp",
        "input_length",
        "output_length",
        "type",
        "turn",
        "hash_ids",
    ),
}


def _int_field(path, line, rec, key, lo=0, required=True, default=-1) -> int:
    if key not in rec:
        if required:
            raise _err(path, line, key, "missing field")
        return default
    v = rec[key]
    if isinstance(v, float) and v.is_integer():
        v = int(v)
    if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= INT32_MAX:
        raise _err(path, line, key, f"expected an integer in [{lo}, {INT32_MAX}], got {v!r}")
    return v


def _check_hashes(path, line, h) -> None:
    if not isinstance(h, list) or not all(
        isinstance(x, int) and not isinstance(x, bool) and 0 <= x < 2**63 for x in h
    ):
        raise _err(
            path, line, "hash_ids", f"expected a list of non-negative integers, got {str(h)[:60]}"
        )


def _read_jsonl(path: Path, fmt: str) -> dict:
    t, inp, out, nblk, hashes, lines = [], [], [], [], [], []
    chat, parent_chat, kind, turn = [], [], [], []
    with open(path, encoding="utf-8") as f:
        for line, text in enumerate(f, start=1):
            if not text.strip():
                continue
            try:
                rec = json.loads(text)
            except json.JSONDecodeError as e:
                raise _err(
                    path, line, None, f"not valid JSON ({e.msg} at character {e.colno})"
                ) from None
            if not isinstance(rec, dict):
                raise _err(path, line, None, f"expected a JSON object, got {text.strip()[:40]!r}")
            ts = rec.get("timestamp")
            if "timestamp" not in rec:
                raise _err(path, line, "timestamp", "missing field")
            if isinstance(ts, bool) or not isinstance(ts, int | float) or not np.isfinite(ts):
                raise _err(path, line, "timestamp", f"expected a number, got {ts!r}")
            t.append(ts)
            inp.append(_int_field(path, line, rec, "input_length"))
            out.append(_int_field(path, line, rec, "output_length"))
            if "hash_ids" not in rec:
                raise _err(path, line, "hash_ids", "missing field")
            h = rec["hash_ids"]
            if type(h) is not list:
                _check_hashes(path, line, h)
            nblk.append(len(h))
            hashes.extend(h)
            lines.append(line)
            if fmt == "bailian":
                if "chat_id" not in rec:
                    raise _err(path, line, "chat_id", "missing field")
                cid = rec["chat_id"]
                if isinstance(cid, bool) or not isinstance(cid, int | str):
                    raise _err(path, line, "chat_id", f"expected an integer or string, got {cid!r}")
                pid = rec.get("parent_chat_id", -1)
                if isinstance(pid, bool) or not (pid is None or isinstance(pid, int | str)):
                    raise _err(
                        path, line, "parent_chat_id", f"expected an integer or string, got {pid!r}"
                    )
                k = rec.get("type", "")
                if not isinstance(k, str | int) or isinstance(k, bool):
                    raise _err(path, line, "type", f"expected a string, got {k!r}")
                chat.append(cid)
                parent_chat.append(pid)
                kind.append(str(k))
                turn.append(_int_field(path, line, rec, "turn", lo=0, required=False))
    if not t:
        raise _err(path, None, None, "no requests")
    try:
        h = np.asarray(hashes)
        ok = h.dtype.kind in "iu" and (h.size == 0 or h.min() >= 0)
    except (ValueError, OverflowError):
        ok = False
    if not ok:  # locate the first bad list (slow path)
        off = 0
        for line, k in zip(lines, nblk, strict=True):
            _check_hashes(path, line, hashes[off : off + k])
            off += k
    res = dict(
        time=np.asarray(t, np.float64),
        input=np.asarray(inp, np.int64),
        output=np.asarray(out, np.int64),
        nblk=np.asarray(nblk, np.int64),
        hashes=np.asarray(hashes, np.int64),
    )
    if fmt == "mooncake":
        res["time"] = res["time"] / 1000.0
    else:
        res.update(chat=chat, parent_chat=parent_chat, kind=kind, turn=np.asarray(turn, np.int32))
    return res


# -- prefix forest ---------------------------------------------------------------------------
def prefix_forest(
    nblk: np.ndarray, hashes: np.ndarray, input_len: np.ndarray, block_size: int
) -> dict[str, np.ndarray]:
    """Segments of the trie of the requests' block sequences (requests in arrival order; request
    r's blocks are hashes[offset[r]:offset[r] + nblk[r]]). Returns prefix_node, prefix_tokens,
    node ([n] int32), node_parent, node_blocks ([num_nodes] int32) and matched_blocks ([n]).
    Vectorised by trie depth: O(total blocks x log) time, no Python loop per block."""
    nblk = np.asarray(nblk, np.int64)
    n = nblk.shape[0]
    total = int(nblk.sum())
    offset = np.r_[0, np.cumsum(nblk)[:-1]].astype(np.int64) if n else np.zeros(0, np.int64)
    empty = np.zeros(0, np.int32)
    if total == 0:
        return dict(
            prefix_node=np.full(n, -1, np.int32),
            prefix_tokens=np.zeros(n, np.int32),
            node=np.full(n, -1, np.int32),
            node_parent=empty,
            node_blocks=empty,
            matched_blocks=np.zeros(n, np.int64),
        )
    _, h = np.unique(np.asarray(hashes, np.int64), return_inverse=True)  # dense hash ids
    num_h = int(h.max()) + 1
    tid = np.empty(total, np.int64)  # trie node of each block
    by_len = np.argsort(-nblk, kind="stable")  # requests with > d blocks: a prefix of by_len
    # counts[d] = number of requests with more than d blocks
    counts = np.searchsorted(np.sort(-nblk), -np.arange(int(nblk.max())), side="left")
    parent_of: list[np.ndarray] = []
    depth_of: list[np.ndarray] = []
    prev = np.full(n, -1, np.int64)  # trie node at depth d-1 of each request (by_len order)
    next_id = 0
    for d in range(int(nblk.max())):
        k = int(counts[d])
        rows = by_len[:k]
        pos = offset[rows] + d
        key = (prev[:k] + 1) * num_h + h[pos]
        uniq, inv = np.unique(key, return_inverse=True)
        ids = next_id + inv
        tid[pos] = ids
        parent_of.append(uniq // num_h - 1)
        depth_of.append(np.full(uniq.shape[0], d, np.int64))
        prev[:k] = ids
        next_id += uniq.shape[0]
    tparent = np.concatenate(parent_of)
    tdepth = np.concatenate(depth_of)
    req = np.repeat(np.arange(n, dtype=np.int64), nblk)
    first = np.full(next_id, n, np.int64)
    np.minimum.at(first, tid, req)
    seen = first[tid] < req
    matched = np.bincount(req, weights=seen, minlength=n).astype(np.int64)
    # segment ends: trie nodes with != 1 child, or where a request ends
    children = np.bincount(tparent[tparent >= 0], minlength=next_id)
    last_pos = offset + nblk - 1
    is_end = np.zeros(next_id, bool)
    is_end[tid[last_pos[nblk > 0]]] = True
    boundary = (children != 1) | is_end
    # radix (segment) ids for boundary trie nodes, in order of first appearance
    bt = np.flatnonzero(boundary)
    order = np.lexsort((tdepth[bt], first[bt]))
    radix = np.full(next_id, -1, np.int64)
    radix[bt[order]] = np.arange(bt.size)
    # each block's segment: the next boundary at or after it on its request's path
    flat_b = boundary[tid]
    idx = np.arange(total, dtype=np.int64)
    nxt = np.minimum.accumulate(np.where(flat_b, idx, total)[::-1])[::-1]
    seg = radix[tid[nxt]]
    # segment parent: the previous boundary on the path (same request), else -1
    prv = np.maximum.accumulate(np.where(flat_b, idx, -1))
    prv_before = np.r_[-1, prv[:-1]]
    prv_before = np.where(prv_before >= offset[req], prv_before, -1)
    node_parent = np.full(bt.size, -1, np.int64)
    bpos = np.flatnonzero(flat_b)
    pp = prv_before[bpos]
    node_parent[seg[bpos]] = np.where(pp >= 0, seg[np.maximum(pp, 0)], -1)
    node_depth = np.zeros(bt.size, np.int64)
    node_depth[seg[bpos]] = tdepth[tid[bpos]] + 1
    node_blocks = node_depth - np.where(node_parent >= 0, node_depth[np.maximum(node_parent, 0)], 0)
    has = nblk > 0
    node = np.full(n, -1, np.int64)
    node[has] = seg[last_pos[has]]
    prefix_node = np.full(n, -1, np.int64)
    m = matched > 0
    at = offset[m] + matched[m] - 1
    assert flat_b[at].all(), "a prefix match ended inside a segment"
    prefix_node[m] = seg[at]
    prefix_tokens = np.minimum(matched * block_size, np.asarray(input_len, np.int64))
    return dict(
        prefix_node=prefix_node.astype(np.int32),
        prefix_tokens=prefix_tokens.astype(np.int32),
        node=node.astype(np.int32),
        node_parent=node_parent.astype(np.int32),
        node_blocks=node_blocks.astype(np.int32),
        matched_blocks=matched,
    )


# -- assembling a Trace ----------------------------------------------------------------------
def _build(
    name: str,
    fmt: str,
    time: np.ndarray,
    inp: np.ndarray,
    out: np.ndarray,
    session=None,
    parent=None,
    turn=None,
    category=None,
    categories=(),
    nblk=None,
    hashes=None,
    block_size: int = 0,
    path=None,
) -> Trace:
    n = time.shape[0]
    if n == 0:
        raise _err(path or name, None, None, "no requests")
    order = np.argsort(time, kind="stable")
    sorted_already = bool(np.all(order == np.arange(n)))
    inv = np.empty(n, np.int64)
    inv[order] = np.arange(n)

    def take(a, fill=-1):
        if a is None:
            return np.full(n, fill, np.int32)
        return np.asarray(a)[order].astype(np.int32)

    parent_s = take(parent)
    if parent is not None and not sorted_already:
        parent_s = np.where(parent_s >= 0, inv[np.maximum(parent_s, 0)], -1).astype(np.int32)
    arrival = time[order] - time[order[0]]
    fields = dict(
        name=name,
        format=fmt,
        arrival=arrival.astype(np.float64),
        input_len=take(inp),
        output_len=take(out),
        session=take(session),
        parent=parent_s,
        turn=take(turn),
        category=take(category),
        categories=tuple(categories),
        block_size=int(block_size),
    )
    if nblk is not None:
        nblk = np.asarray(nblk, np.int64)
        if not sorted_already:
            off = np.r_[0, np.cumsum(nblk)[:-1]]
            new_nblk = nblk[order]
            new_off = np.r_[0, np.cumsum(new_nblk)[:-1]]
            idx = np.arange(int(new_nblk.sum())) + np.repeat(off[order] - new_off, new_nblk)
            hashes = np.asarray(hashes)[idx]
            nblk = new_nblk
        pf = prefix_forest(nblk, hashes, fields["input_len"], block_size)
        pf.pop("matched_blocks")
        fields.update(pf)
    else:
        z = np.zeros(0, np.int32)
        fields.update(
            prefix_node=np.full(n, -1, np.int32),
            prefix_tokens=np.zeros(n, np.int32),
            node=np.full(n, -1, np.int32),
            node_parent=z,
            node_blocks=z,
        )
    return Trace(**fields)


def load_azure(path, name: str | None = None) -> Trace:
    """Azure LLM inference 2023 / 2024 CSV (TIMESTAMP, ContextTokens, GeneratedTokens)."""
    path = Path(path)
    c = _read_csv(path, "azure")
    return _build(name or path.stem, "azure", c["time"], c["input"], c["output"], path=path)


def load_burstgpt(path, name: str | None = None) -> Trace:
    """BurstGPT CSV (Timestamp, Session ID, Elapsed time, Model, Request tokens, Response
    tokens, Total tokens, Log Type); category = 'Model / Log Type'."""
    path = Path(path)
    c = _read_csv(path, "burstgpt")
    n = c["time"].shape[0]
    session = parent = turn = None
    if "session" in c:
        session, _ = _dense_ids(c["session"])
        order = np.argsort(c["time"], kind="stable")
        p, tr = _chain_sessions(session[order])
        parent = np.full(n, -1, np.int32)
        turn = np.full(n, -1, np.int32)
        parent[order] = np.where(p >= 0, order[np.maximum(p, 0)], -1)
        turn[order] = tr
    category, categories = None, ()
    if "model" in c or "log_type" in c:
        labels = [
            " / ".join(x for x in parts if x)
            for parts in zip(c.get("model", [""] * n), c.get("log_type", [""] * n), strict=True)
        ]
        category, categories = _dense_ids(labels)
    return _build(
        name or path.stem,
        "burstgpt",
        c["time"],
        c["input"],
        c["output"],
        session=session,
        parent=parent,
        turn=turn,
        category=category,
        categories=categories,
        path=path,
    )


def load_mooncake(path, name: str | None = None, block_size: int = 512) -> Trace:
    """Mooncake JSONL (timestamp in ms, input_length, output_length, hash_ids)."""
    path = Path(path)
    r = _read_jsonl(path, "mooncake")
    return _build(
        name or path.stem,
        "mooncake",
        r["time"],
        r["input"],
        r["output"],
        nblk=r["nblk"],
        hashes=r["hashes"],
        block_size=block_size,
        path=path,
    )


def load_bailian(
    path, name: str | None = None, block_size: int = 16, timestamp_unit: float = 1.0
) -> Trace:
    """Qwen-Bailian JSONL (chat_id, parent_chat_id, timestamp, input_length, output_length,
    type, turn, hash_ids); timestamps in seconds (`timestamp_unit` = seconds per unit, e.g.
    1e-3 for ms). parent = the request whose chat_id is the parent_chat_id (-1 if none or not
    in the file); session = the root of that chain."""
    path = Path(path)
    r = _read_jsonl(path, "bailian")
    r["time"] = r["time"] * float(timestamp_unit)
    n = r["time"].shape[0]
    index: dict = {}
    for k, cid in enumerate(r["chat"]):
        index.setdefault(cid, k)
    parent = np.array(
        [index.get(p, -1) if p not in (None, -1, "", "-1") else -1 for p in r["parent_chat"]],
        np.int64,
    )
    parent[parent == np.arange(n)] = -1
    session = np.full(n, -1, np.int64)
    order = np.argsort(r["time"], kind="stable")
    next_s = 0
    root = np.full(n, -1, np.int64)
    for k in order:  # parents first (a parent later than its child starts a new session)
        p = parent[k]
        if p >= 0 and root[p] >= 0:
            root[k] = root[p]
        else:
            root[k] = next_s
            next_s += 1
    session[:] = root
    category, categories = _dense_ids(r["kind"])
    return _build(
        name or path.stem,
        "bailian",
        r["time"],
        r["input"],
        r["output"],
        session=session,
        parent=parent,
        turn=r["turn"],
        category=category,
        categories=categories,
        nblk=r["nblk"],
        hashes=r["hashes"],
        block_size=block_size,
        path=path,
    )


# -- save / load / detect --------------------------------------------------------------------
_NPZ_ARRAYS = {
    "arrival": np.float64,
    "input_len": np.int32,
    "output_len": np.int32,
    "session": np.int32,
    "parent": np.int32,
    "turn": np.int32,
    "category": np.int16,
    "prefix_node": np.int32,
    "prefix_tokens": np.int32,
    "node": np.int32,
    "node_parent": np.int32,
    "node_blocks": np.int32,
}


def save_trace(trace: Trace, path) -> None:
    """Write a trace (with its prefix forest) as a compressed .npz that load_trace reads back.
    Columns that carry no information (all -1) are left out."""
    arrays = {}
    for k, dt in _NPZ_ARRAYS.items():
        a = getattr(trace, k)
        if a.size and k not in ("arrival", "input_len", "output_len") and np.all(a == -1):
            continue
        if k == "prefix_tokens" and not trace.has_prefixes:
            continue
        arrays[k] = a.astype(dt)
    np.savez_compressed(
        path,
        version=np.int32(NPZ_VERSION),
        name=np.str_(trace.name),
        format=np.str_(trace.format),
        block_size=np.int32(trace.block_size),
        categories=np.asarray(trace.categories, dtype=str),
        **arrays,
    )


def load_npz(path, name: str | None = None) -> Trace:
    path_s = str(path)
    try:
        z = np.load(path, allow_pickle=False)
    except Exception as e:  # noqa: BLE001 - zip / format errors vary
        raise _err(path_s, None, None, f"not a kvjax trace .npz ({e})") from None
    with z:
        if "version" not in z.files or int(z["version"]) != NPZ_VERSION:
            raise _err(path_s, None, "version", f"not a kvjax trace .npz of version {NPZ_VERSION}")
        for k in ("arrival", "input_len", "output_len"):
            if k not in z.files:
                raise _err(path_s, None, k, "missing array")
        n = z["arrival"].shape[0]
        fields = {}
        for k in _NPZ_ARRAYS:
            if k in z.files:
                fields[k] = z[k].astype(np.float64 if k == "arrival" else np.int32)
            elif k in ("node_parent", "node_blocks"):
                fields[k] = np.zeros(0, np.int32)
            else:
                fields[k] = np.full(n, 0 if k == "prefix_tokens" else -1, np.int32)
        for k in _PER_REQUEST:
            if fields[k].shape != (n,):
                raise _err(path_s, None, k, f"expected shape ({n},), got {fields[k].shape}")
        return Trace(
            name=name or str(z["name"]),
            format=str(z["format"]),
            categories=tuple(str(c) for c in z["categories"]),
            block_size=int(z["block_size"]),
            **fields,
        )


LOADERS = {
    "azure": load_azure,
    "burstgpt": load_burstgpt,
    "mooncake": load_mooncake,
    "bailian": load_bailian,
    "npz": load_npz,
}


def detect_format(path) -> str:
    """The trace format of a file, from its header (CSV) or first record (JSONL)."""
    path = Path(path)
    with open(path, "rb") as f:
        head = f.read(4)
    if head.startswith(b"PK"):
        return "npz"
    with open(path, encoding="utf-8", errors="replace") as f:
        first, line = "", 0
        for text in f:
            line += 1
            if text.strip():
                first = text.strip().lstrip("\ufeff")
                break
    if not first:
        raise _err(path, None, None, "empty file")
    if first.startswith("{"):
        try:
            rec = json.loads(first)
        except json.JSONDecodeError as e:
            raise _err(
                path, line, None, f"not valid JSON ({e.msg} at character {e.colno})"
            ) from None
        if isinstance(rec, dict) and ("chat_id" in rec or "parent_chat_id" in rec):
            return "bailian"
        if isinstance(rec, dict) and ("hash_ids" in rec or "input_length" in rec):
            return "mooncake"
        raise _err(
            path,
            line,
            None,
            "unknown JSONL trace format (expected Mooncake fields "
            "timestamp, input_length, output_length, hash_ids or "
            "Qwen-Bailian fields chat_id, parent_chat_id, ...)",
        )
    header = {_norm(h) for h in next(csv.reader([first]))}
    if "contexttokens" in header or "timestamp" in header and "generatedtokens" in header:
        return "azure"
    if "request tokens" in header or "response tokens" in header:
        return "burstgpt"
    raise _err(
        path,
        line,
        None,
        f"unknown trace format: header {first[:80]!r} is neither "
        "Azure (TIMESTAMP, ContextTokens, GeneratedTokens) nor BurstGPT "
        "(Timestamp, ..., Request tokens, Response tokens, ...)",
    )


def bundled_path(name: str):
    """The packaged .npz of a bundled trace."""
    return resources.files("kvjax.serve") / "data" / "traces" / f"{BUNDLED[name][0]}.npz"


def load_trace(source, format: str | None = None, name: str | None = None, **options) -> Trace:
    """A bundled trace by name (TRACE_NAMES) or a file in any of FORMATS (detected from its
    first line unless `format` is given; `options` go to its loader, e.g. block_size=).
    ValueError for an unknown name, a missing file or a malformed file (naming the file, line
    and column)."""
    if isinstance(source, Trace):
        return source
    if isinstance(source, str) and source in BUNDLED:
        with resources.as_file(bundled_path(source)) as p:
            return load_npz(p, name=name or source)
    path = Path(os.fspath(source))
    if not path.is_file():
        raise ValueError(
            f"unknown trace {str(source)!r}: neither a bundled trace "
            f"({', '.join(TRACE_NAMES)}) nor a readable file"
        )
    if format is None:
        format = detect_format(path)
    if format not in LOADERS:
        raise ValueError(f"unknown trace format {format!r}; allowed: {list(FORMATS)}")
    try:
        return LOADERS[format](path, name=name, **options)
    except UnicodeDecodeError as e:
        raise _err(path, None, None, f"not a UTF-8 text file ({e.reason})") from None


# -- statistics ------------------------------------------------------------------------------
PERCENTILES = (50, 90, 99)


def percentiles(x: np.ndarray, q=PERCENTILES) -> list[int]:
    """Order statistics: the largest value with at most q% of the values below it (numpy's
    'lower' method), the convention of serving.md section 6."""
    return [int(v) for v in np.percentile(np.asarray(x), q, method="lower")]


def per_second_counts(arrival: np.ndarray) -> np.ndarray:
    """Arrivals in each whole second [k, k+1) from 0 to the last arrival."""
    a = np.asarray(arrival, np.float64)
    return np.bincount(np.floor(a - a[0]).astype(np.int64))


def prefix_reuse(trace: Trace) -> dict[str, float] | None:
    """Prefix reuse with an infinite cache: the share of blocks (and tokens) that an earlier
    request already had on the same prefix path. None for traces without hash_ids."""
    if not trace.has_prefixes:
        return None
    depth = trace.node_depth()
    blocks = np.where(trace.node >= 0, depth[np.maximum(trace.node, 0)], 0)
    hit = np.where(trace.prefix_node >= 0, depth[np.maximum(trace.prefix_node, 0)], 0)
    return {
        "block_reuse": float(hit.sum() / max(blocks.sum(), 1)),
        "token_reuse": float(
            trace.prefix_tokens.astype(np.int64).sum()
            / max(trace.input_len.astype(np.int64).sum(), 1)
        ),
        "blocks": int(blocks.sum()),
        "block_size": trace.block_size,
        "segments": trace.num_nodes,
    }


def trace_stats(trace: Trace) -> dict:
    """Arrival rate (requests / (last - first arrival)), burstiness (variance / mean of
    per-second arrival counts), input / output p50 / p90 / p99 and means, and prefix reuse with
    an infinite cache for hash-id traces."""
    n = trace.num_requests
    counts = per_second_counts(trace.arrival)
    st = {
        "name": trace.name,
        "format": trace.format,
        "requests": n,
        "duration_s": round(trace.duration, 3),
        "arrival_rate": n / trace.duration if trace.duration > 0 else None,
        "burstiness": float(counts.var() / counts.mean()),
        "input": dict(
            zip(("p50", "p90", "p99"), percentiles(trace.input_len), strict=True),
            mean=float(trace.input_len.mean()),
            max=int(trace.input_len.max()),
        ),
        "output": dict(
            zip(("p50", "p90", "p99"), percentiles(trace.output_len), strict=True),
            mean=float(trace.output_len.mean()),
            max=int(trace.output_len.max()),
        ),
    }
    if (trace.session >= 0).any():
        st["sessions"] = int(np.unique(trace.session[trace.session >= 0]).size)
    reuse = prefix_reuse(trace)
    if reuse is not None:
        st["prefix_reuse"] = reuse
    return st


def format_stats(st: dict) -> str:
    """The human-readable block `kvjax workload stats` prints."""

    def pct(d):
        return (
            f"p50 {d['p50']:,}  p90 {d['p90']:,}  p99 {d['p99']:,}  "
            f"(mean {d['mean']:,.0f}, max {d['max']:,})"
        )

    lines = [
        f"{st['name']} ({st['format']}): {st['requests']:,} requests over "
        f"{st['duration_s']:,.1f} s",
        f"  arrival rate    {st['arrival_rate'] or float('nan'):.2f} req/s",
        f"  burstiness      {st['burstiness']:.3g} (per-second count variance / mean; Poisson 1)",
        f"  input tokens    {pct(st['input'])}",
        f"  output tokens   {pct(st['output'])}",
    ]
    if "sessions" in st:
        lines.append(f"  sessions        {st['sessions']:,}")
    r = st.get("prefix_reuse")
    if r:
        lines.append(
            f"  prefix reuse    {100 * r['block_reuse']:.1f}% of blocks, "
            f"{100 * r['token_reuse']:.1f}% of input tokens (infinite cache, "
            f"{r['block_size']}-token blocks, {r['segments']:,} prefix segments)"
        )
    return "\n".join(lines)


def plot_trace(trace: Trace, path) -> None:
    """Arrivals per second and input / output length histograms, as a PNG (headless)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(12, 3.6))
    FigureCanvasAgg(fig)
    ax = fig.subplots(1, 3)
    counts = per_second_counts(trace.arrival)
    ax[0].plot(
        np.arange(counts.size), counts, lw=0.3, color="tab:blue", alpha=0.6, label="per second"
    )
    w = min(60, counts.size)
    ax[0].plot(
        np.arange(counts.size - w + 1) + w / 2,
        np.convolve(counts, np.ones(w) / w, "valid"),
        lw=1.2,
        color="k",
        label=f"{w} s mean",
    )
    ax[0].legend(fontsize=7, loc="upper right")
    ax[0].set(title=f"{trace.name}: arrivals", xlabel="time (s)", ylabel="requests / s")
    for a, x, label, color in (
        (ax[1], trace.input_len, "input", "tab:orange"),
        (ax[2], trace.output_len, "output", "tab:green"),
    ):
        x = np.maximum(np.asarray(x), 1)
        bins = np.logspace(np.log10(x.min()), np.log10(x.max() + 1), 60)
        a.hist(x, bins=bins, color=color)
        a.set_xscale("log")
        for q, v in zip(PERCENTILES, percentiles(x), strict=True):
            a.axvline(v, color="k", lw=0.6, ls="--")
            a.text(v, a.get_ylim()[1] * 0.95, f"p{q}", fontsize=7, ha="right", rotation=90)
        a.set(title=f"{label} length", xlabel="tokens", ylabel="requests")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


__all__ = [
    "BUNDLED",
    "FORMATS",
    "TRACE_NAMES",
    "Trace",
    "detect_format",
    "format_stats",
    "load_azure",
    "load_bailian",
    "load_burstgpt",
    "load_mooncake",
    "load_npz",
    "load_trace",
    "per_second_counts",
    "percentiles",
    "plot_trace",
    "prefix_forest",
    "prefix_reuse",
    "save_trace",
    "trace_stats",
]
