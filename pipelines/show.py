"""A page of a store's results: one self-contained HTML file (thumbnails inline, no JavaScript) with each image
and its caption or answer, the error rows with their reasons, and the job's figures.

Run as:
    pixelray show STORE --out FILE.html [--limit 200] [--where COLUMN=VALUE ...]
    pixelray show FEATURE_STORE --out FILE.html --text "a red star"      # search results (the store's index)

`--where` keeps the rows whose column equals (`=`), differs from (`!=`) or contains (`~`) a value, compared
as text; a store with more rows than `--limit` is sampled (the same sample each time), in path order.
"""

from __future__ import annotations

import base64
import html
import io
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

from pixelray.images import open_image
from pixelray.store import ERRORS, Store, where_mask

TEXT_COLUMNS = ("caption", "answer", "text")  # what a row says about its image, first found


@dataclass
class Page:
    path: str
    shown: int  # items on the page
    matching: int  # items that passed --where (or search hits)
    errors: int  # error rows on the page

    def __str__(self) -> str:
        return (f"pixelray show: wrote {self.path}: {self.shown} of {self.matching} items"
                + (f", {self.errors} error rows" if self.errors else ""))


def thumbnail(path: str, side: int) -> str | None:
    """The image at `path` as an inline JPEG data URL, at most `side` px; None when it cannot be opened."""
    try:
        image = open_image(path)
    except Exception:  # (a shard member, a file since moved: the page says so instead)
        return None
    image.thumbnail((side, side))
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=85)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode()


def show_store(uri: str, out: str, limit: int = 200, where: list[str] | tuple[str, ...] = (), text: str | None = None,
               side: int = 192, seed: int = 0) -> Page:
    """Write the page of the store at `uri` to `out` (see the module's docstring)."""
    store, manifest = Store.written(uri)
    job = manifest.get("job", "?")
    if text is not None:
        from pixelray.vector_index import open_index, query_vectors

        index = open_index(uri)
        hits = index.search(query_vectors(index.manifest, texts=[text]), limit)[0]
        rows = [{"path": h.path, "image_id": h.image_id, "score": f"{h.score:.3f}", **h.columns} for h in hits]
        matching = len(rows)
        title = f"search: {text!r}"
    else:
        dataset = store.dataset(store.table)
        columns = [c for c in (dataset.schema.names if dataset else []) if c not in ("embedding", "patch_features")]
        table = dataset.to_table(columns=columns) if dataset else pa.table({})
        if where and table.num_rows:
            table = table.filter(where_mask(table, list(where)))
        matching = table.num_rows
        if table.num_rows > limit:
            keep = np.sort(np.random.default_rng(seed).choice(table.num_rows, limit, replace=False))
            table = table.take(pa.array(keep))
        if "path" in table.column_names:
            table = table.sort_by("path")
        rows = table.to_pylist()
        title = f"{store.table}" + (f" where {' and '.join(where)}" if where else "")
    errors_ds = store.dataset(ERRORS)
    errors = errors_ds.head(limit).to_pylist() if errors_ds is not None else []
    page = _page(store.uri, job, manifest, title, rows, matching, errors, store.run_records(), side)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(page, encoding="utf-8")
    return Page(path=out, shown=len(rows), matching=matching, errors=len(errors))


def _page(uri: str, job: str, manifest: dict, title: str, rows: list[dict], matching: int, errors: list[dict],
          runs: list[dict], side: int) -> str:
    e = html.escape
    cards = []
    for row in rows:
        src = thumbnail(row["path"], side) if row.get("path") else None
        image = (f'<img src="{src}" alt="{e(Path(row["path"]).name)}">' if src
                 else '<div class="missing">no preview</div>')
        said = next((row[c] for c in TEXT_COLUMNS if row.get(c)), None)
        lines = [f'<p class="name">{e(Path(row.get("path") or "?").name)}</p>']
        if row.get("question"):
            lines.append(f'<p class="question">Q: {e(str(row["question"]))}</p>')
        if said:
            lines.append(f'<p class="text">{e(str(said))}</p>')
        details = [f"{k} {row[k]}" for k in ("score", "num_tokens", "finish_reason") if row.get(k) is not None]
        if details:
            lines.append(f'<p class="meta">{e(", ".join(map(str, details)))}</p>')
        cards.append(f'<figure>{image}<figcaption>{"".join(lines)}</figcaption></figure>')
    figures = [f"job: pixelray {e(job)}"] + [f"{e(k)}: {e(str(v))}" for k, v in manifest.items()
                                              if k in ("model", "encoder", "prompt", "question") and v is not None]
    if runs:
        last = runs[-1]
        kinds = ", ".join(f"{k} {n}" for k, n in last["errors_by_type"].items())
        figures.append(f"last run: {e(last['started'])}, {last['seconds']:.1f} s, {last['written']} written, "
                       f"{last['errors']} errors{e(f' ({kinds})' if kinds else '')}, "
                       f"{last['items_per_s']:.2f} {e(last['unit'])}/s")
    error_rows = "".join(f"<tr><td>{e(Path(str(r.get('path') or '?')).name)}</td><td>{e(str(r['error_type']))}</td>"
                         f"<td>{e(str(r['error']))}</td></tr>" for r in errors)
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>pixelray: {e(uri)}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 1.5em; color: #222; }}
.grid {{ display: grid; grid-template-columns: repeat(auto-fill, minmax({side + 16}px, 1fr)); gap: 1em; }}
figure {{ margin: 0; padding: 8px; border: 1px solid #ddd; border-radius: 6px; background: #fafafa; }}
figure img {{ display: block; max-width: 100%; height: auto; margin: 0 auto; }}
.missing {{ height: {side // 2}px; display: flex; align-items: center; justify-content: center; color: #888; }}
.name {{ font-size: 0.8em; color: #666; margin: 0.4em 0 0; word-break: break-all; }}
.text {{ margin: 0.3em 0 0; }} .question {{ margin: 0.3em 0 0; font-style: italic; }}
.meta {{ font-size: 0.75em; color: #888; margin: 0.2em 0 0; }}
table {{ border-collapse: collapse; }} td, th {{ border: 1px solid #ddd; padding: 4px 8px; text-align: left; }}
</style></head><body>
<h1>{e(uri)}</h1>
<p>{"<br>".join(figures)}</p>
<h2>{e(title)}: {len(rows)} of {matching}</h2>
<div class="grid">{"".join(cards)}</div>
<h2>errors: {len(errors)}{" shown" if errors else ""}</h2>
{f"<table><tr><th>file</th><th>type</th><th>reason</th></tr>{error_rows}</table>" if errors else "<p>none</p>"}
<p class="meta">written by pixelray show, {time.strftime("%Y-%m-%d %H:%M")}</p>
</body></html>
"""
