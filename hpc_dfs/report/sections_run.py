"""The sections about training: run facts and configuration, data, curves, validation metrics; the headline."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from hpc_dfs.contracts import run as run_contract
from hpc_dfs.report.charts import curves_png
from hpc_dfs.report.html import esc, figure, flatten_numbers, kv_table, missing, num, table
from hpc_dfs.report.sources import report_time_env, total_seconds
from hpc_dfs.report.stats import val_risk_counts

__all__ = ["environment_rows", "run_facts", "config_rows", "section_run", "feature_sets", "section_data",
           "section_curves", "section_validation", "headline"]


def _recorded_environment(meta: dict | None, run_info: dict | None) -> dict[str, Any]:
    """What train recorded of its software: ``RUN/run.json``, else a checkpoint's ``environment`` (older runs)."""
    if not run_info:
        return (meta or {}).get("environment") or {}
    engine, version = run_info.get("engine"), run_info.get("engine_version")
    horovod = version if engine == "horovod" else f"not used ({engine}{' ' + version if version else ''})"
    return {"torch": run_info.get("torch"), "horovod": horovod, "device": run_info.get("device"),
            "git_commit": run_info.get("git_commit") or "not a git checkout", "launcher": run_info.get("launcher")}


def environment_rows(meta: dict | None, pred_summary: dict | None, run_info: dict | None = None) -> dict[str, str]:
    """torch, Horovod, git commit, launcher and device: recorded by train, else named as not recorded."""
    env = _recorded_environment(meta, run_info)
    now = report_time_env()
    out = {}
    for key, label, now_key in (("torch", "torch", "torch"), ("horovod", "Horovod", "horovod"),
                                ("git_commit", "git commit", "git")):
        rec = env.get(key)
        out[label] = str(rec) if rec else f"not recorded by train (report machine: {now[now_key]})"
    out["launcher"] = str(env.get("launcher") or "not recorded by train")
    dev = env.get("device")
    pdev = (pred_summary or {}).get("device")
    out["device"] = (str(dev) if dev else "not recorded by train") + (f"; predict ran on {pdev}" if pdev else "")
    return out


def run_facts(ctx: dict) -> dict[str, Any]:
    """The run-facts table: what was trained, how long, on what, with which effective batch and LR."""
    last, best, rows, cfg = ctx["last"], ctx["best"], ctx["rows"], ctx["cfg"]
    meta = last or best or {}
    world = meta.get("world_size")
    n_ep, b_ep = ctx["epochs"], ctx["best_epoch"]
    facts: dict[str, Any] = {
        "epochs trained": f"{n_ep} of {cfg.schedule.epochs} configured" if cfg and n_ep is not None else n_ep,
        "best epoch (best.pt)": f"{b_ep} (by validation mean Dice)" if b_ep is not None else None,
        "optimizer steps": meta.get("step"), "ranks (world size)": world}
    if cfg and isinstance(world, int):
        gb = cfg.resolve_global_batch(world)
        facts["effective global batch"] = (f"{gb} (= {cfg.data.batch_size} per rank x {world} ranks"
                                           + (f" x {cfg.horovod.backward_passes_per_step} passes" if
                                              cfg.horovod.backward_passes_per_step > 1 else "") + ")"
                                           if not cfg.data.global_batch_size else f"{gb} (fixed)")
        facts["effective peak learning rate"] = (f"{num(cfg.optim.base_lr * cfg.lr_scale(world), 'lr')} (= "
                                                 f"{num(cfg.optim.base_lr, 'lr')} x {cfg.lr_scale(world):.3g}, "
                                                 f"{cfg.optim.lr_scaling} scaling)")
    secs = total_seconds(rows)
    if secs:
        facts["total training time"] = (f"{secs:.0f} s" if secs < 120 else f"{secs / 60:.1f} min ({secs:.0f} s)") + \
            " (from metrics.jsonl: first to last epoch end, plus the first epoch's steps)"
    mc = meta.get("model_config") or {}
    facts["model"] = f"{mc.get('name')} ({meta.get('n_parameters') or (best or {}).get('n_parameters')} parameters)"
    facts.update(environment_rows(meta, ctx["pred_summary"], ctx["run_info"]))
    facts["hpc-dfs version"] = meta.get("hpc_dfs_version")
    facts["checkpoints"] = ", ".join(str(p) for p in (ctx["last_path"], ctx["best_path"]) if p)
    return facts


def config_rows(cfg, model_config: dict, world: int | None) -> dict[str, Any]:
    """The training settings that apply to this run, zeros that mean "auto" spelled out."""
    if cfg is None:
        return {}
    rows: dict[str, Any] = {"optimizer": cfg.optim.optimizer,
                            "base learning rate (per batch_size)": num(cfg.optim.base_lr, "lr"),
                            "LR schedule": cfg.optim.lr_schedule, "warm-up epochs": f"{cfg.optim.warmup_epochs:g}",
                            "weight decay": f"{cfg.optim.weight_decay:g}"}
    if cfg.optim.optimizer == "sgd":
        rows["momentum"] = f"{cfg.optim.momentum} ({'Nesterov' if cfg.optim.nesterov else 'classical'})"
    if cfg.optim.lr_schedule == "plateau":
        rows["plateau factor / patience"] = f"{cfg.optim.plateau_factor} / {cfg.optim.plateau_patience} epochs"
    rows["batch per rank"] = cfg.data.batch_size
    rows["global batch"] = cfg.data.global_batch_size or (f"auto (batch x ranks = {cfg.resolve_global_batch(world)})"
                                                     if world else "auto (batch x ranks)")
    rows["steps per epoch"] = cfg.schedule.steps_per_epoch or "auto (one pass over the training slices)"
    rows["max steps"] = cfg.schedule.max_steps or "no limit"
    rows["tumour share of each batch (fg_fraction)"] = f"{cfg.data.fg_fraction:g}"
    rows["loss weights (Dice / CE / risk)"] = f"{cfg.loss.dice_weight} / {cfg.loss.ce_weight} / {cfg.loss.risk_weight}"
    rows["augmentation"] = "on" if cfg.data.augment else "off"
    rows["synchronised BatchNorm"] = cfg.horovod.sync_bn if model_config.get("norm", "batch") == "batch" else \
        f"n/a ({model_config.get('norm')} norm)"
    rows["gradient clip (global norm)"] = f"{cfg.optim.grad_clip:g}" if cfg.optim.grad_clip else "off"
    if cfg.horovod.compression != "none" or cfg.horovod.adasum:
        rows["Horovod"] = f"compression {cfg.horovod.compression}, adasum {cfg.horovod.adasum}"
    rows["validation fold / every"] = f"fold {cfg.schedule.val_fold}, every {cfg.schedule.val_every} epoch(s)"
    rows["seed"] = cfg.seed
    for k in ("name", "base_channels", "depth", "norm", "fusion", "n_clinical", "n_classes", "in_channels"):
        if k in model_config:
            rows[f"model: {k}"] = model_config[k]
    return rows


def output_rows(meta: dict) -> dict[str, Any]:
    """What the network learns: its classes, and softmax over them or the regions it was trained on (sigmoid)."""
    classes = list(meta.get("classes") or [])
    regions = meta.get("regions")
    if not classes:
        return {}
    rows: dict[str, Any] = {"classes": ", ".join(f"{i} {c}" for i, c in enumerate(classes))}
    if isinstance(regions, dict) and regions.get("classes"):
        sets = ["{" + ", ".join(classes[int(i)] for i in r) + "}" for r in regions["classes"]]
        order = ", ".join(classes[int(v)] for v in regions.get("labels", []))
        rows["segmentation output"] = (f"{regions.get('name', '')} regions, one sigmoid each: " + "; ".join(
            f"{n} = {s}" for n, s in zip(regions.get("names", []), sets)) + f" (BCE + soft Dice); labels written "
            f"in the order {order}")
    else:
        rows["segmentation output"] = f"softmax over the {len(classes)} classes (CE + soft Dice)"
    return rows


def section_run(ctx: dict) -> str:
    """Run facts and the configuration that applies to the run."""
    meta = ctx["last"] or ctx["best"]
    if meta is None:
        return "<h2>Run</h2>" + missing(f"no checkpoint in {ctx['run'] / 'checkpoints'}",
                                        "run `hpc-dfs train --out RUN` first")
    out = ["<h2>Run</h2>", kv_table(run_facts(ctx), "facts")]
    rows = config_rows(ctx["cfg"], meta.get("model_config") or {}, meta.get("world_size"))
    rows.update(output_rows(meta) if rows else {})
    if rows:
        out += ["<h3>Configuration (what applies to this run)</h3>", kv_table(rows)]
    elif (ctx["run"] / run_contract.CONFIG_NAME).is_file():
        out += ["<details open><summary>config.toml</summary><pre>",
                esc((ctx["run"] / run_contract.CONFIG_NAME).read_text()),
                "</pre></details>"]
    return "\n".join(out)


def _split_counts(manifest: dict, cfg, evaluation: dict | None) -> dict[str, Any]:
    cases = manifest.get("cases", [])
    folds: dict = {}
    for c in cases:
        folds[c.get("fold")] = folds.get(c.get("fold"), 0) + 1
    risk = [c.get("risk_label") for c in cases]
    out: dict[str, Any] = {"cases": len(cases), "cases per fold": dict(sorted(folds.items(), key=str))}
    if cfg is not None:
        n_val = folds.get(cfg.schedule.val_fold, 0)
        out["train / validation cases"] = f"{len(cases) - n_val} / {n_val} (fold {cfg.schedule.val_fold})"
    if evaluation:
        m = evaluation.get("mean_all") or evaluation.get("mean") or {}
        out["test cases (evaluated)"] = m.get("n_cases")
    out["malignant / benign / unknown"] = f"{risk.count(1)} / {risk.count(0)} / {sum(r not in (0, 1) for r in risk)}"
    out["slices"] = sum(c.get("n_slices", 0) for c in cases)
    out["slices with kidney"] = sum((c.get("slices_with") or {}).get("kidney", 0) for c in cases)
    out["slices with tumour"] = sum((c.get("slices_with") or {}).get("tumor", 0) for c in cases)
    return out


def feature_sets(meta: dict | None, clin_metrics: dict | None) -> str:
    """One list of clinical feature names, saying which model uses which."""
    fusion = list(((meta or {}).get("clinical") or {}).get("feature_names") or [])
    clinical = list((clin_metrics or {}).get("feature_names") or [])
    if not fusion and not clinical:
        return ""
    names = list(dict.fromkeys(fusion + clinical))
    only_f = [n for n in fusion if n not in clinical]
    only_c = [n for n in clinical if n not in fusion]
    text = f"<p>{len(names)} clinical feature names in all"
    detail = ""
    if fusion and clinical:
        text += (f": the fusion model uses {len(fusion)}, the clinical model {len(clinical)}, "
                 f"{len(fusion) - len(only_f)} of them shared (the others differ in name or encoding)")
        detail = "".join(f"<p>only the {who}: <code>{esc(', '.join(ns))}</code></p>"
                         for who, ns in (("fusion model", only_f), ("clinical model", only_c)) if ns)
    text += (f".</p><details><summary>feature names</summary><p><code>{esc(', '.join(names))}</code></p>"
             f"{detail}</details>")
    return text


def section_data(ctx: dict) -> str:
    """Case counts and split (``--shards``), preprocessing, fingerprint and the clinical features."""
    meta, manifest, shards = ctx["best"] or ctx["last"], ctx["manifest"], ctx["shards"]
    out = ["<h2>Data</h2>"]
    if meta and meta.get("preprocessing"):
        out += ["<details><summary>preprocessing stored with the model (predict reproduces it exactly)</summary>",
                kv_table(flatten_numbers(meta["preprocessing"])), "</details>"]
    if manifest:
        out += [f"<p>Shards <code>{esc(shards)}</code>:</p>", kv_table(_split_counts(manifest, ctx["cfg"],
                                                                                     ctx["evaluation"]))]
        fp = manifest.get("fingerprint")
        if isinstance(fp, dict):
            out += ["<details><summary>dataset fingerprint</summary>", kv_table(flatten_numbers(fp)), "</details>"]
    elif not meta:
        out.append(missing("no checkpoint and no manifest", "pass --shards SHARDS or train a model"))
    else:
        out.append('<p class="note">Pass <code>--shards SHARDS</code> for case counts, folds and the fingerprint.</p>')
    out.append(feature_sets(meta, ctx["clin_metrics"]))
    return "\n".join(out)


METRIC_COLUMNS = (("epoch", "epoch", "int"), ("train_loss", "train loss", "loss"), ("val_loss", "val loss", "loss"),
                  ("kidney_dice", "val kidney Dice", "dice"), ("tumor_dice", "val tumour Dice", "dice"),
                  ("masses_dice", "val masses Dice", "dice"),
                  ("risk_auc", "val risk AUC", "dice"), ("risk_acc", "val risk accuracy", "dice"),
                  ("lr", "lr", "lr"), ("samples_per_s", "samples/s", "s"), ("allreduce_frac", "allreduce share",
                                                                             "dice"))


def section_curves(run: Path, rows: list[dict], ctx: dict, title: str = "Training curves") -> str:
    """Loss, Dice, risk and LR per epoch (best epoch marked) and every epoch's metrics in a table."""
    out = [f"<h2>{esc(title)}</h2>"]
    n_val = (((ctx["last"] or ctx["best"] or {}).get("metrics")) or {}).get("n_val_cases")
    counts = val_risk_counts(ctx["manifest"], ctx["cfg"])
    if rows:
        png = curves_png(rows, ctx["best_epoch"], n_val, sum(counts) if counts else None)
        out.append(figure(png, "training curves (rendered from metrics.jsonl)",
                          f"Training curves rendered from metrics.jsonl: {len(rows)} epochs; dashed line = best "
                          f"epoch ({esc(ctx['best_epoch'])}); validation over {esc(n_val)} case(s)."))
    elif (run / run_contract.CURVES_NAME).is_file():
        out.append(figure((run / run_contract.CURVES_NAME).read_bytes(), "training curves",
                          "RUN/curves.png (no metrics.jsonl)"))
    else:
        return out[0] + missing(f"no {run_contract.metrics_path(run)}", "written by `hpc-dfs train` after every epoch")
    keys = [c for c in METRIC_COLUMNS if any(c[0] in r for r in rows)]
    body = [[num(r.get(k), kind) if k != "epoch" else esc(r.get(k)) for k, _, kind in keys] for r in rows]
    best = ctx["best_epoch"]
    html_rows = "".join(("<tr class='best'>" if r.get("epoch") == best else "<tr>") + "".join(
        f"<td>{c}</td>" for c in b) + "</tr>" for r, b in zip(rows, body))
    head = "".join(f"<th>{esc(h)}</th>" for _, h, _ in keys)
    if rows:
        out += [f"<details><summary>metrics.jsonl: every epoch ({len(rows)}; the best one highlighted)</summary>",
                f"<table><thead><tr>{head}</tr></thead><tbody>{html_rows}</tbody></table></details>"]
    return "\n".join(out)


def section_validation(ctx: dict, title: str = "Validation metrics") -> str:
    """Validation metrics of the best and the last epoch, each with its n."""
    out = [f"<h2>{esc(title)}</h2>"]
    last_m = ((ctx["last"] or {}).get("metrics")) or {}
    best_m = ((ctx["best"] or {}).get("metrics")) or {}
    if not (last_m or best_m):
        return out[0] + missing("no validation metrics",
                                "they come from `hpc-dfs train` (checkpoint and metrics.jsonl)")
    counts = val_risk_counts(ctx["manifest"], ctx["cfg"])
    n_val = last_m.get("n_val_cases", best_m.get("n_val_cases"))
    n_risk = f"n={sum(counts)} ({counts[0]} malignant / {counts[1]} benign)" if counts else f"n={n_val}"
    rows = [("kidney Dice (2D slices)", f"n={n_val}", "kidney_dice"), ("tumour Dice (2D slices)", f"n={n_val}",
                                                                       "tumor_dice"),
            *([("masses Dice (tumour or cyst; 2D slices)", f"n={n_val}", "masses_dice")]
              if "masses_dice" in last_m or "masses_dice" in best_m else []),
            ("validation loss", f"n={n_val}", "val_loss"), ("risk AUC (malignant)", n_risk, "risk_auc"),
            ("risk accuracy (malignant at P >= 0.5)", n_risk, "risk_acc")]
    out.append(table(["metric", "cases", f"best epoch ({ctx['best_epoch']})", f"last epoch ({ctx['epochs']})"],
                     [[name, n, num(best_m.get(k), "loss" if "loss" in k else "dice"),
                       num(last_m.get(k), "loss" if "loss" in k else "dice")] for name, n, k in rows]))
    out.append("<p class='note'>Validation Dice is computed on the validation fold's 2D slices at the training "
               "resolution, pooled per case, before post-processing; the test Dice under Evaluation is in 3D at "
               "the native resolution after post-processing, on other cases. They are not expected to agree, "
               "least of all for small tumours.</p>")
    return "\n".join(out)


def headline(ctx: dict) -> str:
    """One sentence: the test score with its n and detection count, the model and how long it was trained."""
    parts = []
    ev = ctx["evaluation"] or {}
    m = ev.get("mean_all") if (ev.get("mean_all") or {}).get("n_missing") else ev.get("mean")
    if ev.get("regions") == "kits23" and m:
        parts.append(f"Test: KiTS23 mean Dice <b>{num(m.get('mean_dice'))}</b> (kidney and masses "
                     f"{num(m.get('Dice_kidney'))}, masses {num(m.get('Dice_masses'))}, tumour "
                     f"{num(m.get('Dice_tumor'))}), mean surface Dice {num(m.get('mean_sd'))} on "
                     f"n={esc(m.get('n_cases'))} cases")
    elif m and m.get("kits_score") is not None:
        det = ""
        if "n_tumors_gt" in m:
            det = (f"; tumours: {m['n_tumors_hit']} of {m['n_tumors_gt']} hit, {m['n_tumors_missed']} missed, "
                   f"{m['n_tumors_wrong_kidney']} in the wrong kidney")
        parts.append(f"Test: KiTS19 score <b>{num(m['kits_score'])}</b> (kidney Dice {num(m['kidney_dice'])}, tumour "
                     f"Dice {num(m['tumor_dice'])}) on n={esc(m['n_cases'])} cases{esc(det)}")
    meta = ctx["last"] or ctx["best"]
    if meta:
        parts.append(f"model {esc((meta.get('model_config') or {}).get('name'))} trained for "
                     f"<b>{esc(ctx['epochs'])} epochs</b> (best epoch {esc(ctx['best_epoch'])}) on "
                     f"{esc(meta.get('world_size'))} rank(s)")
    return f"<p>{'; '.join(parts)}.</p>" if parts else ""
