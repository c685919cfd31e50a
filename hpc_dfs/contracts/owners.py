"""Who owns which file: the verb that writes each contract's fixed names (CONTRACTS.md, "Who owns which file").

A verb never replaces an existing file that another verb owns (:func:`hpc_dfs.fsutil.check_owner`, run by every
atomic write while ``cli.main`` runs a verb): ``report --out RUN/checkpoints/last.pt`` or ``evaluate --out
PRED/summary.json`` is refused before anything is written. The names come from the contract modules, so this
index holds no file name of its own. Files of other names (an ``--out`` the user chose) are not checked.
"""
from __future__ import annotations

import fnmatch
from functools import lru_cache
from pathlib import Path

__all__ = ["owners", "owner_of"]


@lru_cache(maxsize=1)
def owners() -> dict[str, tuple[str, ...]]:
    """``{verb: file-name patterns}`` of the files each verb writes under a fixed name."""
    from hpc_dfs.contracts import checkpoint, evaluation, kits, prediction, run, shards
    from hpc_dfs.fsutil import LOCK_NAME

    per_case = prediction.case_files(Path("."), "*", raw=False)
    return {
        "synth": (kits.IMAGE_NAME, *kits.LABEL_FILES, kits.CLINICAL_NAME, kits.KITS23_CLINICAL_NAME),
        "preprocess": (shards.MANIFEST_NAME, shards.CLINICAL_PIPELINE_NAME, shards.shard_name("*")),
        "train": ("*" + Path(checkpoint.LAST_NAME).suffix, run.METRICS_NAME, run.RUN_INFO_NAME, run.CONFIG_NAME,
                  run.CURVES_NAME, run.CV_NAME, run.FOLD_INFO_NAME, LOCK_NAME),
        "predict": (prediction.SUMMARY_NAME, prediction.RISK_NAME, *(p.name for p in per_case.values())),
        "evaluate": (evaluation.EVAL_NAME,),
    }


def owner_of(path: str | Path) -> str | None:
    """The verb that writes files of ``path``'s name, or None (a name no contract fixes).

    Args:
        path: a file.
    """
    name = Path(path).name
    return next((verb for verb, pats in owners().items() if any(fnmatch.fnmatchcase(name, p) for p in pats)), None)
