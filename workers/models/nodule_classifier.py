"""False-positive reduction of the built-in lung-nodule detector: two small learned stages.

* **Stage 1**, an MLP over the 32 hand-made features of every candidate (thousands per scan),
  keeps the ``top_k`` most nodule-like.
* **Stage 2**, a tiny 3D CNN (or an ensemble of them, trained from different seeds, whose
  logits are averaged; members may differ in whether they see the context channels), looks at
  each of those as a scale-normalised patch (a cube of six estimated radii, 16³ samples, two
  channels: density and lung mask) together with the features. It learns what the features
  cannot say well: a vessel stub leaving the mediastinum versus a nodule sitting on the pleura,
  a branch point versus a nodule touching a vessel.

Both are trained on synthetic phantoms by ``training/train_fp_reduction.py`` (a checkout's),
stage 2 then fine-tuned on real lungs with simulated nodules inserted by
``training/finetune_real.py``; the weights (``weights/lung_nodules_fp.pt``) are loaded with
``torch.load(weights_only=True)`` after their SHA-256 is checked against
``weights/lung_nodules_fp.json``.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from dicom_node.errors import ModelLoadError

PATCH = 16
PATCH_RADII = 6.0
"""Patch side in estimated radii."""
MIN_SIDE_MM = 12.0
MAX_SIDE_MM = 90.0
HU_LOW, HU_HIGH = -1000.0, 200.0


class FeatureMlp(nn.Module):
    """Stage 1: standardised features -> logit."""

    mean: torch.Tensor
    std: torch.Tensor

    def __init__(self, n_features: int, hidden: int = 32) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(n_features))
        self.register_buffer("std", torch.ones(n_features))
        self.net = nn.Sequential(
            nn.Linear(n_features, hidden), nn.ReLU(), nn.Linear(hidden, hidden // 2), nn.ReLU(), nn.Linear(hidden // 2, 1)
        )

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.net((features - self.mean) / self.std)[:, 0]


class PatchCnn(nn.Module):
    """Stage 2: (N, C, 16, 16, 16) patches + standardised features -> logit. ``channels`` is 2
    (density and lung mask at the candidate's scale) or 4 (the same again on a cube ``context``
    times wider, so the CNN sees where a vessel under the candidate runs on to)."""

    mean: torch.Tensor
    std: torch.Tensor

    def __init__(self, n_features: int, channels: int = 2) -> None:
        super().__init__()
        self._channels = channels
        self.register_buffer("mean", torch.zeros(n_features))
        self.register_buffer("std", torch.ones(n_features))
        self.conv = nn.Sequential(
            nn.Conv3d(channels, 16, 3, padding=1), nn.ReLU(), nn.MaxPool3d(2),
            nn.Conv3d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool3d(2),
            nn.Conv3d(32, 48, 3, padding=1), nn.ReLU(), nn.AdaptiveMaxPool3d(1),
        )  # fmt: skip
        self.head = nn.Sequential(nn.Linear(48 + n_features, 64), nn.ReLU(), nn.Linear(64, 1))

    @property
    def channels(self) -> int:
        """Input channels: 2, or 4 with the context channels."""
        return self._channels

    def forward(self, patches: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        z = self.conv(patches).flatten(1)
        f = (features - self.mean) / self.std
        return self.head(torch.cat([z, f], dim=1))[:, 0]


def sample_patches(
    image: torch.Tensor,
    mask: torch.Tensor,
    centres_ijk: np.ndarray,
    spacing_image: tuple[float, float, float],
    mask_scale: tuple[float, float, float],
    radius_mm: np.ndarray,
    mask_origin: tuple[float, float, float] = (0.0, 0.0, 0.0),
    side_scale: float = 1.0,
) -> torch.Tensor:
    """Scale-normalised patches around fractional voxel centres of ``image``.

    ``image`` (K, R, C) is HU at ``spacing_image`` mm; ``mask`` is the lung mask on a grid whose
    index is ``(image index - mask_origin) / mask_scale`` (per axis). Returns (N, 2, 16, 16, 16):
    density mapped to 0..1 over -1000..200 HU, and the mask, sampled trilinearly on a cube of
    side ``clip(6 r, 12, 90)`` mm (times ``side_scale``), axes in patient-aligned (k, j, i) order.
    """
    n = len(centres_ijk)
    if n == 0:
        return torch.zeros((0, 2, PATCH, PATCH, PATCH))
    side = np.clip(PATCH_RADII * radius_mm, MIN_SIDE_MM, MAX_SIDE_MM) * side_scale
    offsets = (np.arange(PATCH) - (PATCH - 1) / 2) / PATCH  # fractions of the side
    sp = np.array(spacing_image)
    # Sample positions in image index space: (N, P, P, P, 3) as (k, j, i).
    grid_mm = offsets[None, :, None] * side[:, None, None]  # (N, P, 1)
    kk = centres_ijk[:, 0, None] + grid_mm[:, :, 0] / sp[0]
    jj = centres_ijk[:, 1, None] + grid_mm[:, :, 0] / sp[1]
    ii = centres_ijk[:, 2, None] + grid_mm[:, :, 0] / sp[2]
    out = []
    for vol, scale, origin, normalise in (
        (image, (1.0, 1.0, 1.0), (0.0, 0.0, 0.0), True),
        (mask, mask_scale, mask_origin, False),
    ):
        shape = vol.shape
        # grid_sample wants (x, y, z) = (i, j, k) normalised to [-1, 1] (align_corners=True).
        gk = torch.from_numpy(((kk - origin[0]) / scale[0]) / max(shape[0] - 1, 1) * 2 - 1).float()
        gj = torch.from_numpy(((jj - origin[1]) / scale[1]) / max(shape[1] - 1, 1) * 2 - 1).float()
        gi = torch.from_numpy(((ii - origin[2]) / scale[2]) / max(shape[2] - 1, 1) * 2 - 1).float()
        grid = torch.stack(
            torch.broadcast_tensors(
                gi[:, None, None, :], gj[:, None, :, None], gk[:, :, None, None]
            ),
            dim=-1,
        )  # (N, P, P, P, 3)
        # One batch of one volume: all candidates' cubes stacked along the depth axis (no copy
        # of the volume per candidate).
        g = grid.reshape(1, n * PATCH, PATCH, PATCH, 3)
        p = F.grid_sample(vol.float()[None, None], g, mode="bilinear", padding_mode="border", align_corners=True)
        p = p.reshape(n, PATCH, PATCH, PATCH)
        if normalise:
            p = ((p.clamp(HU_LOW, HU_HIGH) - HU_LOW) / (HU_HIGH - HU_LOW))
        out.append(p)
    return torch.stack(out, dim=1)


class FpReducer:
    """The two stages with their weights, checked by SHA-256 and loaded without pickle."""

    def __init__(
        self,
        stage1: FeatureMlp,
        stage2: PatchCnn | Sequence[PatchCnn],
        features: tuple[str, ...],
        *,
        top_k: int = 400,
        threshold: float = 0.5,
        version: str = "0",
        sha256: str | None = None,
        card: dict[str, Any] | None = None,
    ) -> None:
        self.stage1 = stage1.eval()
        self.stage2 = [m.eval() for m in ([stage2] if isinstance(stage2, PatchCnn) else stage2)]
        if not self.stage2:
            raise ValueError("stage 2 needs at least one model")
        self.features = tuple(features)
        self.top_k = int(top_k)
        self.threshold = float(threshold)
        self.version = version
        self.sha256 = sha256
        self.card = card or {}
        self.views = int(self.card.get("views", 1))
        self.context = float(self.card.get("context") or 0.0) or None
        """Side factor of the stage-2 context channels; None when the patches have none."""

    @classmethod
    def load(cls, card_path: Path) -> FpReducer:
        """Load the weights named by ``card_path`` (JSON) after checking their SHA-256."""
        try:
            card = json.loads(card_path.read_text())
            weights = card_path.with_name(card["file"])
            blob = weights.read_bytes()
        except (OSError, ValueError, KeyError) as exc:
            raise ModelLoadError(f"FP-reduction weights card {card_path.name} is unusable: {exc}") from exc
        digest = hashlib.sha256(blob).hexdigest()
        if digest != card.get("sha256"):
            raise ModelLoadError(
                f"FP-reduction weights {weights.name}: SHA-256 is {digest[:12]}..., the card "
                f"{card_path.name} says {str(card.get('sha256'))[:12]}...; refusing to load"
            )
        features = tuple(card["features"])
        state = torch.load(weights, map_location="cpu", weights_only=True)
        stage1 = FeatureMlp(len(features), hidden=int(card.get("stage1_hidden", 32)))
        stage1.load_state_dict(state["stage1"])
        # One stage-2 state dict, or a list of them (an ensemble).
        stage2_states = state["stage2"] if isinstance(state["stage2"], list) else [state["stage2"]]
        # Every member sees the context channels when the card has them, unless the card names
        # each member's channels (an ensemble mixing members with and without context).
        channels = card.get("stage2_channels") or [4 if card.get("context") else 2] * len(stage2_states)
        if len(channels) != len(stage2_states) or any(c not in (2, 4) for c in channels) or (
            max(channels) == 4 and not card.get("context")
        ):
            raise ModelLoadError(
                f"FP-reduction weights card {card_path.name}: stage2_channels {channels} does not fit "
                f"{len(stage2_states)} stage-2 model(s) and context {card.get('context')}"
            )
        stage2 = []
        for stage2_state, n_channels in zip(stage2_states, channels, strict=True):
            model = PatchCnn(len(features), channels=int(n_channels))
            try:
                model.load_state_dict(stage2_state)
            except RuntimeError as exc:
                raise ModelLoadError(f"FP-reduction weights {weights.name} do not match the card: {exc}") from exc
            stage2.append(model)
        return cls(
            stage1,
            stage2,
            features,
            top_k=int(card.get("top_k", 400)),
            threshold=float(card.get("threshold", 0.5)),
            version=str(card.get("version", "0")),
            sha256=digest,
            card=card,
        )

    def stage1_scores(self, features: np.ndarray) -> np.ndarray:
        if len(features) == 0:
            return np.zeros(0)
        with torch.no_grad():
            return torch.sigmoid(self.stage1(torch.from_numpy(features.astype(np.float32)))).numpy().astype(np.float64)

    def stage2_scores(self, patches: torch.Tensor, features: np.ndarray, *, views: int | None = None) -> np.ndarray:
        """Stage-2 probabilities; the mean logit over the ensemble's models and ``views``
        mirrored/transposed copies of each patch (test-time augmentation with the symmetries
        used in training)."""
        if len(features) == 0:
            return np.zeros(0)
        views = self.views if views is None else views
        out = []
        with torch.no_grad():
            for start in range(0, len(features), 256):
                f = torch.from_numpy(features[start : start + 256].astype(np.float32))
                p = patches[start : start + 256]
                # A member without context takes the first two channels (the candidate's scale).
                logits = torch.stack(
                    [m(_view(p[:, : m.channels], v), f) for m in self.stage2 for v in range(views)]
                ).mean(0)
                out.append(torch.sigmoid(logits))
        return torch.cat(out).numpy().astype(np.float64)


def _view(p: torch.Tensor, v: int) -> torch.Tensor:
    """The v-th symmetry of (N, C, K, J, I) patches: identity, mirrors, in-plane transpose."""
    if v == 0:
        return p
    if v == 1:
        return p.flip(2)
    if v == 2:
        return p.flip(3, 4)
    if v == 3:
        return p.transpose(3, 4)
    return p.flip(2, 3).transpose(3, 4)
