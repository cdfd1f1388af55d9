"""Files of a routing-stats run: the tables (CSV), the summary (JSON with provenance), the per-token trace
(JSON lines) and the routing replay file (safetensors), the last two streamed batch by batch.

routing.safetensors is the replay contract with the throughput, flops and comm commands: tensors
`layer{i}.topk_ids` (int64 [T, K], real tokens only, in input order) and metadata n_experts, expert_types and
checkpoint. It is assembled from per-layer spill files at the end, so memory stays bounded however many tokens
were routed.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
from pathlib import Path
from typing import Callable

import torch

from ..measure import routing_stats as rs
from ..measure.token_input import Batch
from .files import result_document, rows_to_csv, write_atomic

SCHEMA_KIND = "routing-stats"
SCHEMA_VERSION = 1
ROUTING_FILE = "routing.safetensors"
TRACE_FILE = "trace.jsonl"
SUMMARY_FILE = "summary.json"


class RoutingIdsWriter:
    """A batch sink that appends each layer's real-token topk_ids to a spill file; finish() writes the
    safetensors file (header first, then the spills in layer order) and removes the spills."""

    def __init__(self, out_dir: Path, n_layers: int, top_k: int, metadata: dict[str, str]):
        self.out_dir, self.top_k, self.metadata = Path(out_dir), top_k, metadata
        self.spill_paths = [self.out_dir / f".routing.layer{i}.spill" for i in range(n_layers)]
        self.spills = [open(p, "wb") for p in self.spill_paths]
        self.rows = 0

    def __call__(self, batch: Batch, records) -> None:
        valid_T = batch.mask_BS.reshape(-1)
        for fh, rec in zip(self.spills, records):
            ids_RK = rec.topk_ids.cpu()[valid_T].to(torch.int64).contiguous()
            fh.write(ids_RK.numpy().astype("<i8", copy=False).tobytes())
        self.rows += int(valid_T.sum())

    def finish(self) -> Path:
        for fh in self.spills:
            fh.close()
        header: dict = {"__metadata__": self.metadata}
        offset, nbytes = 0, self.rows * self.top_k * 8
        for i in range(len(self.spill_paths)):
            header[f"layer{i}.topk_ids"] = {"dtype": "I64", "shape": [self.rows, self.top_k],
                                            "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
        head = json.dumps(header, separators=(",", ":")).encode("utf-8")
        head += b" " * (-len(head) % 8)  # the data starts 8-byte aligned
        target = self.out_dir / ROUTING_FILE
        tmp = self.out_dir / f".{ROUTING_FILE}.tmp"
        with open(tmp, "wb") as out:
            out.write(struct.pack("<Q", len(head)))
            out.write(head)
            for path in self.spill_paths:
                with open(path, "rb") as src:
                    shutil.copyfileobj(src, out, 1 << 22)
        os.replace(tmp, target)
        self.discard()
        return target

    def discard(self) -> None:
        for fh in self.spills:
            fh.close()
        for path in self.spill_paths:
            path.unlink(missing_ok=True)


class TraceWriter:
    """A batch sink writing one JSON line per real token: task, sequence, position in the sequence, offset in
    the task's token stream, token id and string, and per MoE layer the chosen experts and their gates."""

    def __init__(self, path: Path, task_names: list[str], token_string: Callable[[int], str]):
        self.path = Path(path)
        self.fh = open(self.path, "w", encoding="utf-8")
        self.task_names, self.token_string = task_names, token_string
        self._strings: dict[int, str] = {}

    def _string(self, token_id: int) -> str:
        if token_id not in self._strings:
            self._strings[token_id] = self.token_string(token_id)
        return self._strings[token_id]

    def __call__(self, batch: Batch, records) -> None:
        B, S = batch.input_ids_BS.shape
        ids_L = [rec.topk_ids.cpu().view(B, S, -1).tolist() for rec in records]
        gates_L = [rec.gates.cpu().float().view(B, S, -1).tolist() for rec in records]
        lengths = batch.mask_BS.sum(1).tolist()
        tokens = batch.input_ids_BS.tolist()
        lines = []
        for b in range(B):
            task, seq, start = self.task_names[int(batch.task_B[b])], int(batch.seq_B[b]), int(batch.start_B[b])
            for s in range(lengths[b]):
                layers = [{"experts": ids_L[l][b][s], "gates": [round(g, 6) for g in gates_L[l][b][s]]}
                          for l in range(len(records))]
                lines.append(json.dumps({"task": task, "seq": seq, "pos": s, "offset": start + s,
                                         "id": tokens[b][s], "token": self._string(tokens[b][s]),
                                         "layers": layers}, ensure_ascii=False))
        self.fh.write("\n".join(lines) + "\n")

    def finish(self) -> Path:
        self.fh.close()
        return self.path


# Tables ----------------------------------------------------------------------------------------------------
EXPERT_LOAD_COLUMNS = ["layer", "expert", "expert_type", "tokens", "share", "kept", "dropped"]
TOKEN_COLUMNS = ["token_id", "token", "occurrences", "mean_ffn_experts"]


def write_routing_tables(out_dir: Path, run: rs.RoutingRun, token_string: Callable[[int], str], provenance: dict,
                         summary_extra: dict) -> list[Path]:
    """Every CSV table and summary.json; returns the paths written."""
    out_dir = Path(out_dir)
    tables: dict[str, tuple[list[dict], list[str] | None]] = {
        "expert_load": (rs.expert_load_rows(run), EXPERT_LOAD_COLUMNS),
        "ffn_per_token": (rs.ffn_per_token_rows(run), None),
        "token_ffn": (rs.token_rows(run, token_string), TOKEN_COLUMNS),
        "imbalance": (rs.imbalance_rows(run), None),
        "coactivation": (rs.coactivation_rows(run), None),
        "layer_correlation": (rs.layer_correlation_rows(run), None),
    }
    scores = rs.score_summary_rows(run.stats, "on")
    hist = rs.score_hist_rows(run.stats, "on")
    if run.ablated is not None:
        scores += rs.score_summary_rows(run.ablated, "off")
        hist += rs.score_hist_rows(run.ablated, "off")
        tables["ffn_per_token_no_residual"] = (rs.ffn_per_token_rows(run, run.ablated), None)
    tables["routing_scores"] = (scores, None)
    tables["routing_score_hist"] = (hist, None)
    written = []
    for name, (rows, columns) in tables.items():
        written.append(write_atomic(out_dir / f"{name}.csv", rows_to_csv(rows, columns)))
    high, low = rs.extreme_tokens(tables["token_ffn"][0], summary_extra.get("min_count", 1),
                                  summary_extra.get("top", 10))
    doc = result_document(SCHEMA_KIND, SCHEMA_VERSION, rs.layer_summary_rows(run), provenance,
                          **summary_extra, highest_tokens=high, lowest_tokens=low)
    written.append(write_atomic(out_dir / SUMMARY_FILE, json.dumps(doc, indent=2, ensure_ascii=False) + "\n"))
    return written
