"""The report of ``bench quality``: markdown tables and the learning-curve plot, made from ``quality.json`` only.

    quality_report.write(result, out_dir)   # OUT/quality.md and OUT/quality_curve.png
    quality_report.markdown(result)         # the tables of the README (so that the JSON and README cannot disagree)

A difference between two rows is called only where its 95 % interval excludes 0: the paired bootstrap of the
per-case differences (``hpc_dfs.metrics.intervals.paired_difference``; both rows are scored on the same cases),
or, for rows of an earlier run without per-case figures, where the two rows' own intervals separate
(``separable``). Otherwise the table says "not separable".
"""
from __future__ import annotations

import os
from pathlib import Path

from hpc_dfs.metrics.intervals import paired_difference, separable

METRICS = (("kidney_dice", "kidney Dice"), ("tumor_dice", "tumour Dice"), ("tumor_detection_rate", "tumours hit"))
PEER = "nnunet"


def _iv(fig: dict | None) -> str:
    if not fig:
        return "-"
    lo, hi = fig["ci95"]
    return f"{fig['mean']:.3f} [{lo:.2f}, {hi:.2f}]"


def _hits(fig: dict | None) -> str:
    if not fig:
        return "-"
    lo, hi = fig["ci95"]
    return f"{fig['hits']}/{fig['total']} = {fig['mean']:.2f} [{lo:.2f}, {hi:.2f}]"


def _fmt(key: str, fig: dict | None) -> str:
    return _hits(fig) if key == "tumor_detection_rate" else _iv(fig)


def difference(ours: dict | None, peer: dict | None, metric: str) -> dict | None:
    """The paired difference ``ours - peer`` of ``metric`` over their common cases (blocks with ``per_case``)."""
    a, b = ((blk or {}).get("per_case", {}).get(metric) for blk in (ours, peer))
    return paired_difference(a, b) if a and b else None


def verdict(ours: dict | None, peer: dict | None, metric: str) -> str:
    """``ahead`` / ``behind`` where the paired difference's interval excludes 0 (or, without per-case figures,
    where the two intervals separate), else ``not separable``; ``ours``/``peer`` are a row or its ``unseen``."""
    a, b = (ours or {}).get(metric), (peer or {}).get(metric)
    if not a or not b:
        return "-"
    d = difference(ours, peer, metric)
    if d is not None:
        return _paired_call(d)
    if not separable(a, b):
        return "not separable"
    return "ahead" if a["mean"] > b["mean"] else "behind"


def _paired_call(d: dict) -> str:
    """The verdict of a paired difference: called only where its interval excludes 0."""
    lo, hi = d["ci95"]
    return "not separable" if lo <= 0 <= hi else ("ahead" if d["mean"] > 0 else "behind")


def _diff(ours: dict | None, peer: dict | None, metric: str) -> str:
    d = difference(ours, peer, metric)
    if d is None:
        return "-"
    lo, hi = d["ci95"]
    call = _paired_call(d) if (ours or {}).get(metric) and (peer or {}).get(metric) else "-"
    return f"{d['mean']:+.3f} [{lo:+.2f}, {hi:+.2f}] {call}"


def selection_score(row: dict) -> float:
    """Mean kidney and tumour Dice over the renders a row was scored on: how ``--eval-data`` picks its row."""
    vals = [(block or {}).get(m) for block in (row, row.get("unseen")) if block for m in ("kidney_dice", "tumor_dice")]
    vals = [v["mean"] for v in vals if v]
    return sum(vals) / len(vals) if vals else 0.0


def curve_table(result: dict) -> str:
    rows = [r for r in result["rows"] if r["section"] == "curve"]
    head = ("| budget | system | train s | kidney Dice [95% CI] | tumour Dice [95% CI] | tumours hit [95% CI] | "
            "unseen renderer: kidney | unseen: tumour | hpc-dfs vs nnU-Net (kidney / tumour; ours, unseen) |")
    lines = [head, "|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (r["budget_x"], r["system"] != "hpc-dfs")):
        u = r.get("unseen") or {}
        call = ""
        if r["system"] == "hpc-dfs":
            peer = next((p for p in rows if p["system"] == PEER and p["budget_x"] == r["budget_x"]), None)
            if peer:
                pu = peer.get("unseen") or {}
                call = (f"{verdict(r, peer, 'kidney_dice')} / {verdict(r, peer, 'tumor_dice')}; "
                        f"{verdict(u, pu, 'kidney_dice')} / {verdict(u, pu, 'tumor_dice')}")
        lines.append(f"| {r['budget_x']:g}x ({r['budget_s']:.0f} s) | {r['system']} | {r['train_s']:.0f} | "
                     f"{_iv(r['kidney_dice'])} | {_iv(r['tumor_dice'])} | {_hits(r['tumor_detection_rate'])} | "
                     f"{_iv(u.get('kidney_dice'))} | {_iv(u.get('tumor_dice'))} | {call} |")
    return "\n".join(lines)


def difference_table(result: dict) -> str:
    """hpc-dfs minus nnU-Net per budget: the mean per-case difference with its paired 95 % interval."""
    rows = [r for r in result["rows"] if r["section"] == "curve"]
    lines = ["| budget | kidney Dice, ours | tumour Dice, ours | kidney Dice, unseen | tumour Dice, unseen |",
             "|---|---|---|---|---|"]
    for r in sorted((r for r in rows if r["system"] == "hpc-dfs"), key=lambda r: r["budget_x"]):
        peer = next((p for p in rows if p["system"] == PEER and p["budget_x"] == r["budget_x"]), None)
        if peer is None:
            continue
        u, pu = r.get("unseen"), peer.get("unseen")
        lines.append(f"| {r['budget_x']:g}x | {_diff(r, peer, 'kidney_dice')} | {_diff(r, peer, 'tumor_dice')} | "
                     f"{_diff(u, pu, 'kidney_dice')} | {_diff(u, pu, 'tumor_dice')} |")
    return "\n".join(lines)


def size_table(result: dict) -> str:
    rows = [r for r in result["rows"] if r.get("detection_by_size")]
    classes = list(rows[0]["detection_by_size"]) if rows else []
    lines = ["| row | budget | " + " | ".join(f"detected, {c}" for c in classes) + " |",
             "|---|---|" + "---|" * len(classes)]
    for r in rows:
        cells = " | ".join(_hits(r["detection_by_size"].get(c)) for c in classes)
        lines.append(f"| {r['system']}: {r['row']} | {r['budget_x']:g}x | {cells} |")
    return "\n".join(lines)


def ablation_table(result: dict) -> str:
    x = result.get("ablation_x")
    # the FiLM cascade at the ablation's budget is the curve's row when the curve has that budget (trained once)
    base = next((r for r in result["rows"] if r["system"] == "hpc-dfs" and r["budget_x"] == x
                 and r["row"].startswith("hpc-dfs cascade, FiLM")), None)
    rows = ([base] if base else []) + [r for r in result["rows"] if r["section"] == "ablation" and r is not base]
    lines = ["| row | training cases | train s | kidney Dice [95% CI] | tumour Dice [95% CI] | tumours hit | "
             "unseen: kidney | unseen: tumour | minus cascade, FiLM: kidney (ours) | minus cascade, FiLM: tumour "
             "(ours) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        u = r.get("unseen") or {}
        call = (" | " if r is base or base is None
                else f"{_diff(r, base, 'kidney_dice')} | {_diff(r, base, 'tumor_dice')}")
        lines.append(f"| {r['row']} | {r.get('n_train_cases', '-')} | {r['train_s']:.0f} | {_iv(r['kidney_dice'])} | "
                     f"{_iv(r['tumor_dice'])} | {_hits(r['tumor_detection_rate'])} | {_iv(u.get('kidney_dice'))} | "
                     f"{_iv(u.get('tumor_dice'))} | {call} |")
    return "\n".join(lines)


def robustness_table(result: dict) -> str:
    """Rows aimed at the unseen renderer beside the curve's FiLM cascade and nnU-Net at the same budget."""
    rows = [r for r in result["rows"] if r["section"] == "robustness"]
    lines = ["| row | budget | train s | kidney Dice, ours | tumour Dice, ours | kidney Dice, unseen | "
             "tumour Dice, unseen | unseen kidney minus cascade, FiLM | unseen kidney minus nnU-Net |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ref = next((c for c in result["rows"] if c["section"] == "curve" and c["system"] == "hpc-dfs"
                    and c["budget_x"] == r["budget_x"]), None)
        peer = next((c for c in result["rows"] if c["system"] == PEER and c["budget_x"] == r["budget_x"]), None)
        u = r.get("unseen") or {}
        lines.append(f"| {r['row']} | {r['budget_x']:g}x | {r['train_s']:.0f} | {_iv(r['kidney_dice'])} | "
                     f"{_iv(r['tumor_dice'])} | {_iv(u.get('kidney_dice'))} | {_iv(u.get('tumor_dice'))} | "
                     f"{_diff(u, (ref or {}).get('unseen'), 'kidney_dice')} | "
                     f"{_diff(u, (peer or {}).get('unseen'), 'kidney_dice')} |")
    return "\n".join(lines)


def markdown(result: dict) -> str:
    """The README tables of a ``quality.json``: the curve (hpc-dfs beside nnU-Net), detection by size, ablation."""
    parts = [curve_table(result), "", "hpc-dfs minus nnU-Net, per case (mean difference [paired 95% CI]):", "",
             difference_table(result), "", size_table(result)]
    if any(r["section"] == "ablation" for r in result["rows"]):
        parts += ["", f"Ablation, every row at {result.get('ablation_x')}x the base budget:", "",
                  ablation_table(result)]
    if any(r["section"] == "robustness" for r in result["rows"]):
        parts += ["", "Rows aimed at the unseen renderer:", "", robustness_table(result)]
    return "\n".join(parts)


def plot(result: dict, path: Path) -> Path | None:
    """The learning curve: Dice (95 % interval) against the training budget, per system and renderer."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in result["rows"] if r["section"] == "curve"]
    if not rows:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharex=True)
    colours = {"hpc-dfs": "tab:blue", PEER: "tab:orange"}
    for ax, (key, title) in zip(axes, METRICS[:2]):
        for system in colours:
            for render, style in (("ours", "-"), ("unseen", "--")):
                pts = []
                for r in sorted((r for r in rows if r["system"] == system), key=lambda r: r["budget_s"]):
                    fig_ = r.get(key) if render == "ours" else (r.get("unseen") or {}).get(key)
                    if fig_:
                        pts.append((r["budget_s"], fig_["mean"], fig_["ci95"]))
                if not pts:
                    continue
                x = [p[0] * (1.03 if system == PEER else 1.0) for p in pts]
                y = [p[1] for p in pts]
                err = [[p[1] - p[2][0] for p in pts], [p[2][1] - p[1] for p in pts]]
                ax.errorbar(x, y, yerr=err, fmt=style + "o", color=colours[system], capsize=3,
                            label=f"{'nnU-Net v2' if system == PEER else 'hpc-dfs'}, "
                                  f"{'our renderer' if render == 'ours' else 'unseen renderer'}")
        ax.set_xscale("log")
        xs = [r["budget_s"] for r in rows]
        ax.set_xlim(min(xs) / 1.6, max(xs) * 1.6)
        ax.set_xlabel("training budget (s, 2 CPU cores)")
        ax.set_ylabel(title)
        ax.set_ylim(0, 1)
        ax.set_title(f"{title}, {rows[0]['n_val_cases']} validation cases, 95% CI")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp-{path.name}")
    fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    os.replace(tmp, path)
    return path


def write(result: dict, out_dir: Path) -> None:
    """``OUT/quality.md`` (settings, tables, plot) and ``OUT/quality_curve.png``."""
    png = plot(result, out_dir / "quality_curve.png")
    text = [f"# bench quality{' (--quick: a smoke run, not a result)' if result.get('quick') else ''}", "",
            f"Machine: {result['machine']}. Base budget {result['base_s']:g} s; budgets "
            f"{', '.join(f'{b:g}x' for b in result['budgets'])}; the unseen renderer scored at "
            f"{', '.join(f'{b:g}x' for b in result['unseen_budgets'])}. nnU-Net plan: {result['nnunet_plan']}.", ""]
    if png:
        text += [f"![learning curve]({png.name})", ""]
    text += [markdown(result), ""]
    tmp = out_dir / ".tmp-quality.md"
    tmp.write_text("\n".join(text))
    os.replace(tmp, out_dir / "quality.md")
