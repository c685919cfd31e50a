"""The per-fold preprocessing: ordinal/binary coding, imputation, scaling and risk orientation (one Pipeline)."""
from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from sklearn.base import BaseEstimator, TransformerMixin

__all__ = ["RiskOrientation", "build_preprocessor", "feature_names"]


class RiskOrientation(TransformerMixin, BaseEstimator):
    """Multiply each column by the sign of (mean over label 1) - (mean over label 0).

    Hand-written because sklearn has no such step. Fitted on training rows (it needs ``y``), it
    makes every feature point the same way ("larger = closer to label 1"), which a sequence model
    with one shared input weight, like the Clinical-GRU, cannot learn per position on its own.
    A pure sign flip: logistic regression and random forests are unaffected by it.
    """

    def fit(self, X: Any, y: Any) -> "RiskOrientation":
        X = np.asarray(X, dtype=float)
        y = np.asarray(y)
        if y.ndim != 1 or len(y) != len(X) or not ((y == 0).any() and (y == 1).any()):
            raise ValueError("RiskOrientation.fit needs 0/1 labels of both classes, one per row")
        diff = X[y == 1].mean(axis=0) - X[y == 0].mean(axis=0)
        self.sign_ = np.where(diff < 0, -1.0, 1.0)
        self.n_features_in_ = X.shape[1]
        return self

    def transform(self, X: Any) -> np.ndarray:
        return np.asarray(X, dtype=float) * self.sign_

    def get_feature_names_out(self, input_features: Any = None) -> np.ndarray:
        return np.asarray(input_features, dtype=object)


def build_preprocessor(X: pd.DataFrame, levels: dict) -> Any:
    """The per-fold feature pipeline: encode+impute (column order kept) -> scale -> orient.

    Columns in ``levels`` are imputed with the most frequent level and coded 0/1 (risk level = 1);
    numeric columns are median-imputed; other object columns are one-hot encoded. Fit it with
    ``pipe.fit(X_train, y_train)`` on the training rows of a fold only.
    """
    from sklearn.compose import ColumnTransformer
    from sklearn.impute import SimpleImputer
    from sklearn.pipeline import Pipeline, make_pipeline
    from sklearn.preprocessing import OneHotEncoder, OrdinalEncoder, StandardScaler

    parts = []
    for col in X.columns:
        if col in levels:
            enc = make_pipeline(SimpleImputer(strategy="most_frequent"),
                                OrdinalEncoder(categories=[list(levels[col])]))
        elif pd.api.types.is_numeric_dtype(X[col]):
            enc = SimpleImputer(strategy="median", keep_empty_features=True)
        else:
            enc = make_pipeline(SimpleImputer(strategy="most_frequent", keep_empty_features=True),
                                OneHotEncoder(handle_unknown="ignore", sparse_output=False))
        parts.append((col, enc, [col]))
    encode = ColumnTransformer(parts, verbose_feature_names_out=False)
    return Pipeline([("encode", encode), ("scale", StandardScaler()), ("orient", RiskOrientation())])


def feature_names(pipe: Any) -> list[str]:
    """The names of the fitted pipeline's output columns, in order.

    Args:
        pipe: the fitted pipeline of :func:`build_preprocessor`.
    """
    names = []
    for name, trans, cols in pipe.named_steps["encode"].transformers_:
        if name == "remainder":
            continue
        out = list(trans.get_feature_names_out(cols)) if hasattr(trans, "get_feature_names_out") else list(cols)
        names += [str(n) for n in out]
    return names
