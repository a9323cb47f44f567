"""What a store holds: its settings, tables and counts, errors by type, the runs that wrote it, its schema and a
few rows.

Run as:
    pixelray inspect STORE [--rows 3]
"""

from __future__ import annotations

import json
from typing import Any

import pyarrow.compute as pc

from pixelray.store import ERRORS, Store

MAX_CHARS = 100  # a value shown in a row is cut to this


def inspect_store(uri: str, rows: int = 3) -> str:
    """A report of the store at `uri` (ValueError when it is not a pixelray store)."""
    store, manifest = Store.written(uri)
    job = manifest.get("job", "?")
    lines = [f"{store.uri}: written by `pixelray {job}`"]
    lines += [f"  {key}: {_short(value)}" for key, value in manifest.items() if key != "job"]
    lines.append("tables:")
    for table in (store.table, ERRORS):
        count, files = store.count(table)
        lines.append(f"  {table + '/':10s} {count} rows in {files} files")
    if (errors := store.dataset(ERRORS)) is not None and errors.count_rows():
        kinds = pc.value_counts(errors.to_table(columns=["error_type"])["error_type"]).to_pylist()
        lines.append("  errors by type: " + ", ".join(f"{k['values']} {k['counts']}" for k in kinds))
    runs = store.run_records()
    lines.append(f"runs ({len(runs)}):" if runs else "runs: none recorded")
    for r in runs:
        kinds = ", ".join(f"{k} {n}" for k, n in r["errors_by_type"].items())
        lines.append(f"  {r['started']}  {r['seconds']:.1f} s  {r['written']} written, {r['errors']} errors"
                     + (f" ({kinds})" if kinds else "") + f", {r['items_per_s']:.2f} {r['unit']}/s"
                     + (f", {r['previously_stored']} already stored" if r["previously_stored"] else ""))
    if (table := store.dataset(store.table)) is not None:
        lines.append(f"schema of {store.table}/:")
        lines += [f"  {field.name}: {field.type}" for field in table.schema]
        head = table.head(rows).to_pylist() if rows else []
        if head:
            lines.append(f"first {len(head)} rows:")
            for row in head:
                lines.append("  " + ", ".join(f"{k}={_short(v)}" for k, v in row.items()))
    return "\n".join(lines)


def _short(value: Any) -> str:
    if isinstance(value, list) and value and all(isinstance(v, (int, float)) for v in value):
        return f"[{len(value)} numbers]"
    text = value if isinstance(value, str) else json.dumps(value)
    return text if len(text) <= MAX_CHARS else text[: MAX_CHARS - 3] + "..."
