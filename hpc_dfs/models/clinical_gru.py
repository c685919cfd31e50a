"""Clinical-GRU (the DFS paper's clinical model) and a clinical encoder for fusion.

The paper feeds the clinical feature vector to a GRU as a *sequence of scalars*: a record with
``F`` features becomes a sequence of length ``F`` with input size 1. The last hidden state (32
units) goes through dropout and ``Linear(32, 1)`` with a sigmoid. Because the input size is 1, the
parameter count does not depend on ``F``:

    GRU(1, 32):  3 * (32*1 + 32*32 + 32 + 32) = 3,360
    Linear(32, 1):                                  33
    total                                        3,393   (the paper's Table 2)

:class:`ClinicalGRU` returns the *logit* so that training can use
:class:`torch.nn.BCEWithLogitsLoss` (numerically stable); :meth:`ClinicalGRU.predict_proba` applies the
paper's sigmoid.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from .dropout import SampleDropout

__all__ = ["ClinicalGRU", "ClinicalEncoder"]


def _check_clinical(x: torch.Tensor, n_features: int, who: str) -> None:
    if x.dim() != 2 or x.shape[1] != n_features:
        raise ValueError(f"{who} expects clinical features of shape [B, {n_features}], got {tuple(x.shape)}")


class ClinicalGRU(nn.Module):
    """The paper's Clinical-GRU: ``[B, F]`` features -> risk logit ``[B]``.

    Args:
        n_features: number of (transformed) clinical features ``F``; the sequence length.
        hidden: GRU hidden size (32 in the paper).
        dropout: dropout on the last hidden state.
    """

    #: the clinical features are its only input: ``forward(clinical)``
    takes_clinical = True

    def __init__(self, n_features: int, hidden: int = 32, dropout: float = 0.2) -> None:
        super().__init__()
        if n_features < 1:
            raise ValueError(f"ClinicalGRU needs at least one clinical feature, got n_features={n_features}")
        self.n_features = n_features
        self.gru = nn.GRU(input_size=1, hidden_size=hidden, batch_first=True)
        self.dropout = SampleDropout(dropout)
        self.fc = nn.Linear(hidden, 1)

    def hidden_state(self, x: torch.Tensor) -> torch.Tensor:
        """Last GRU hidden state ``[B, hidden]`` of the feature sequence."""
        _check_clinical(x, self.n_features, type(self).__name__)
        _, h_n = self.gru(x.unsqueeze(-1))  # [B, F] -> sequence [B, F, 1]
        return h_n[-1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Risk logit ``[B]`` (apply a sigmoid, or :meth:`predict_proba`, for the probability)."""
        return self.fc(self.dropout(self.hidden_state(x))).squeeze(-1)

    @torch.no_grad()
    def predict_proba(self, x: torch.Tensor) -> torch.Tensor:
        """Risk probability ``sigmoid(logit)`` ``[B]`` (the paper's sigmoid output)."""
        return torch.sigmoid(self.forward(x))


class ClinicalEncoder(nn.Module):
    """Clinical embedding for fusion: the Clinical-GRU's hidden state projected to ``embed_dim``.

    The GRU has the same name and shape as :class:`ClinicalGRU`'s (``gru.*``), so weights of a
    Clinical-GRU trained by ``hpc-dfs clinical`` can be loaded into it
    (``encoder.gru.load_state_dict(clinical_gru.gru.state_dict())``).

    Args:
        n_features: number of clinical features ``F``.
        hidden: GRU hidden size.
        embed_dim: size of the returned embedding.
        dropout: dropout on the embedding.
    """

    def __init__(self, n_features: int, hidden: int = 32, embed_dim: int = 32, dropout: float = 0.2) -> None:
        super().__init__()
        if n_features < 1:
            raise ValueError(f"ClinicalEncoder needs at least one clinical feature, got n_features={n_features}")
        self.n_features = n_features
        self.embed_dim = embed_dim
        self.gru = nn.GRU(input_size=1, hidden_size=hidden, batch_first=True)
        self.proj = nn.Sequential(nn.Linear(hidden, embed_dim), nn.ReLU(inplace=True), SampleDropout(dropout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, F]`` -> embedding ``[B, embed_dim]``."""
        _check_clinical(x, self.n_features, type(self).__name__)
        _, h_n = self.gru(x.unsqueeze(-1))
        return self.proj(h_n[-1])
