"""The page's HTML: the style sheet, escaped and formatted cells, tables, embedded pictures, the warnings box."""
from __future__ import annotations

import base64
import html
import math
from typing import Any, Iterable

__all__ = ["CSS", "esc", "fmt", "num", "table", "kv_table", "img_tag", "figure", "missing", "warnings_box",
           "flatten_numbers", "page"]


CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2em auto;max-width:1200px;color:#222;
line-height:1.45;padding:0 1em}
h1{border-bottom:2px solid #345;padding-bottom:.2em}h2{margin-top:2em;color:#234;border-bottom:1px solid #ccd}
table{border-collapse:collapse;margin:.6em 0;font-size:.92em}td,th{border:1px solid #ccd;padding:.25em .6em;
text-align:right}th{background:#eef2f7}td:first-child,th:first-child{text-align:left}
.missing{color:#a33;font-style:italic}.note{color:#555;font-size:.9em}img{max-width:100%;border:1px solid #dde;
margin:.4em 0}details{margin:.5em 0}code{background:#f3f3f6;padding:0 .25em}
.grid{display:flex;flex-wrap:wrap;gap:1em}.grid figure{margin:0;flex:0 1 48%}figcaption{font-size:.9em;color:#444}
.warnings{border:2px solid #c60;background:#fff6ec;padding:.4em 1.2em;margin:1em 0}
.warnings h3{margin:.3em 0;color:#a40}
.ok{border:2px solid #393;background:#f1fbf1;padding:.4em 1.2em;margin:1em 0}
.facts td:first-child{font-weight:600}table.kv td{text-align:left}tr.best td{background:#fff3d6}
"""


def esc(v: Any) -> str:
    """HTML-escaped text of ``v``."""
    return html.escape(str(v))


def fmt(v: Any, digits: int = 4) -> str:
    """Generic cell text: floats with ``digits`` decimals (scientific only when tiny or huge), None as "-"."""
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        if math.isnan(v):
            return "-"
        return f"{v:.{digits}g}" if abs(v) >= 1e4 or (v != 0 and abs(v) < 1e-3) else f"{v:.{digits}f}"
    if isinstance(v, (list, tuple)):
        return ", ".join(fmt(x, digits) for x in v)
    if isinstance(v, dict):
        return ", ".join(f"{k}: {fmt(x, digits)}" for k, x in v.items())
    return str(v)


def num(v: Any, kind: str = "dice") -> str:
    """One number format per kind: dice/auc 3 decimals, ml/mm/s 1 decimal, lr 3 significant digits."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    if not isinstance(v, (int, float)) or isinstance(v, bool):
        return fmt(v)
    spec = {"dice": ".3f", "ml": ".1f", "mm": ".1f", "s": ".1f", "lr": ".3g", "loss": ".4f", "int": ".0f"}[kind]
    return format(float(v), spec)


def table(header: Iterable[Any], rows: Iterable[Iterable[Any]], raw: bool = False) -> str:
    """An HTML table; cells are escaped and formatted with :func:`fmt` unless ``raw`` (pre-made HTML)."""
    head = "".join(f"<th>{esc(h)}</th>" for h in header)
    cell = (lambda c: str(c)) if raw else (lambda c: esc(fmt(c)))
    body = "".join("<tr>" + "".join(f"<td>{cell(c)}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def kv_table(d: dict, cls: str = "") -> str:
    """A two-column setting/value table (left-aligned values)."""
    t = table(["setting", "value"], [(k, v) for k, v in d.items()])
    return t.replace("<table>", f"<table class='kv {cls}'>".replace(" '", "'"), 1)


def img_tag(png: bytes, alt: str) -> str:
    """An ``<img>`` with ``png`` embedded as base64 (no file, no request)."""
    return f'<img alt="{esc(alt)}" src="data:image/png;base64,{base64.b64encode(png).decode("ascii")}">'


def figure(png: bytes, alt: str, caption: str) -> str:
    """A captioned embedded picture (``caption`` is HTML)."""
    return f"<figure>{img_tag(png, alt)}<figcaption>{caption}</figcaption></figure>"


def missing(what: str, how: str) -> str:
    """One line naming a missing source and the command that makes it."""
    return f'<p class="missing">{esc(what)} &mdash; {esc(how)}</p>'


def warnings_box(lines: list[str]) -> str:
    """The warnings box at the top of the page (a green box when there is nothing to warn of)."""
    if not lines:
        return "<div class='ok'><h3>No warnings</h3><p>No tumour missed, and none of the checks below fired.</p></div>"
    items = "".join(f"<li>{esc(w)}</li>" for w in lines)
    return f"<div class='warnings' id='warnings'><h3>Warnings ({len(lines)})</h3><ul>{items}</ul></div>"


def flatten_numbers(d: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dict -> {"a.b": value}; lists of plain values are kept (shown comma-separated), others left out."""
    out: dict[str, Any] = {}
    if isinstance(d, dict):
        for k, v in d.items():
            out.update(flatten_numbers(v, f"{prefix}{k}."))
    elif isinstance(d, (int, float, str, bool)) or d is None:
        out[prefix[:-1]] = d
    elif isinstance(d, (list, tuple)) and len(d) <= 16 and all(
            isinstance(x, (int, float, str, bool)) or x is None for x in d):
        out[prefix[:-1]] = list(d)
    return out


def page(title: str, body: list[str]) -> str:
    """The self-contained HTML document: ``title``, the style sheet and the ``body`` parts.

    Args:
        title: the page title (plain text).
        body: HTML parts, in order.
    """
    return ("<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
            f"<title>{esc(title)}</title><style>{CSS}</style></head><body>"
            + "\n".join(body) + "</body></html>\n")
