"""Fine-tune stage 2 of the shipped FP-reduction weights with hard negatives from real lungs.

Starts from a weights card (default the shipped ``lung_nodules_fp.json``), keeps its stage 1
(and so which candidates reach stage 2) and continues training every stage-2 CNN on

* the candidates mined from real scans by :mod:`training.real_negatives` (hard negatives:
  ``label == 0``, outside the tumour boxes and their margin) or by :mod:`training.real_inserted`
  (the same scans with simulated nodules inserted, whose candidates on them, and on the known
  tumour, are ``label == 1``): negatives weighted ``--real-weight``, positives
  ``--real-pos-weight``; ``--exclude`` leaves a patient's scans out (cross-validation folds);
* the stage-2 patches of training phantoms (``--phantom-seeds``, the same generator, cache and
  labels as ``training/train_fp_reduction.py``), so that what stage 2 knows about nodules stays.

Then validates the whole detector on phantoms the weights never saw (``--val-seeds``: solid
>= 5 mm and all >= 4 mm FROC) and writes ``<out>/<name>.pt`` and ``<name>.json`` (a card in
the shipped card's format: SHA-256, training data, validation). The operating threshold stays
the starting card's unless ``--threshold`` says otherwise.

Honesty rule: real scans listed in :data:`training.real_negatives.HELD_OUT` are refused as
training input; the card names the real scans used so a report never quotes a figure on them.

    .venv/bin/python -m training.finetune_real --real /tmp/realneg --cache /tmp/fp-cache \\
        --phantom-seeds 1000-1007 --val-seeds 1064-1071 --out training/candidates \\
        --name lung_nodules_fp_v2

The cross-validated run behind ``lung_nodules_fp_v3`` (docs/detection.md, "Real chest CT"):

    .venv/bin/python -m training.real_inserted --out /tmp/realins --rounds 5 --per-round 10 \\
        ../shared/data/real-chest-ct/lung-pet-ct-dx-*
    .venv/bin/python -m training.finetune_real --real /tmp/realins ... --exclude a0001   # fold A
    .venv/bin/python -m training.real_inserted --weights FOLD_A.json --seed 2 --rounds 3 \\
        --out /tmp/evalA ../shared/data/real-chest-ct/lung-pet-ct-dx-a0001-*
    .venv/bin/python -m training.sweep_real /tmp/evalA /tmp/evalB      # threshold by CV
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from training.real_negatives import HELD_OUT
from training.train_fp_reduction import (
    RESERVED_SEEDS,
    _augment,
    _seeds,
    collect,
    load_phantom,
    phantom_volume,
    rebuild_candidates,
    validate,
)
from workers.models.lung_nodules import FEATURE_NAMES, WEIGHTS, LungNoduleDetector
from workers.models.nodule_classifier import FpReducer, PatchCnn


def real_set(
    folder: Path, exclude: list[str] | None = None
) -> tuple[torch.Tensor, np.ndarray, np.ndarray, list[str]]:
    """Patches, features and labels (0 or 1) of the real candidates under ``folder``
    (``*.npz`` of :mod:`training.real_negatives` or :mod:`training.real_inserted`; candidates
    labelled -1 are left out), leaving out files whose name contains one of ``exclude``."""
    patches, feats, labels, names = [], [], [], []
    for path in sorted(folder.glob("*.npz")):
        if any(word in path.stem for word in exclude or []):
            continue
        if any(path.stem.startswith(held) for held in HELD_OUT):
            raise SystemExit(f"{path.stem} is held out for reporting; it must not be trained on")
        z = np.load(path)
        use = z["label"] >= 0
        patches.append(torch.from_numpy(z["patches"][use].astype(np.float32)))
        feats.append(z["features"][use])
        labels.append(z["label"][use].astype(np.float32))
        names.append(path.stem)
        print(
            f"  real {path.stem}: {int((z['label'] == 0).sum())} negatives, "
            f"{int((z['label'] == 1).sum())} positives",
            flush=True,
        )
    if not names:
        raise SystemExit(f"no real training scans under {folder}")
    return torch.cat(patches), np.concatenate(feats), np.concatenate(labels), names


def phantom_set(
    detector: LungNoduleDetector,
    reducer: FpReducer,
    seeds: list[int],
    cache: Path,
    nodules: int,
    juxtavascular: float,
) -> tuple[torch.Tensor, np.ndarray, np.ndarray]:
    """Stage-2 patches, features and labels of the training phantoms (top_k of stage 1)."""
    patches, feats, labels = [], [], []
    for seed in seeds:
        t = time.time()
        d = collect(seed, cache, detector, nodules, juxtavascular)
        hu, truth = load_phantom(seed, cache, nodules, juxtavascular)
        cands = rebuild_candidates(d, phantom_volume(hu, truth))
        top = np.argsort(-reducer.stage1_scores(d.features))[: reducer.top_k]
        patches.append(detector.patches(cands, top, context=reducer.context))
        feats.append(d.features[top])
        labels.append((d.hit[top] >= 0).astype(np.float32))
        print(
            f"  phantom {seed}: {len(top)} patches, {int(labels[-1].sum())} positive ({time.time() - t:.0f} s)",
            flush=True,
        )
    return torch.cat(patches), np.concatenate(feats), np.concatenate(labels)


def finetune(
    model: PatchCnn,
    patches: torch.Tensor,
    feats: np.ndarray,
    labels: np.ndarray,
    weights: np.ndarray,
    *,
    epochs: int,
    lr: float,
    seed: int,
) -> PatchCnn:
    """Continue training ``model`` (its feature standardisation unchanged)."""
    torch.manual_seed(seed)
    f = torch.from_numpy(feats.astype(np.float32))
    y = torch.from_numpy(labels.astype(np.float32))
    w = torch.from_numpy(weights.astype(np.float32))
    p = patches[:, : model.channels]
    opt = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=1e-5)
    gen = torch.Generator().manual_seed(seed)
    for epoch in range(epochs):
        model.train()
        order = torch.randperm(len(y), generator=gen)
        total = 0.0
        for start in range(0, len(y), 128):
            idx = order[start : start + 128]
            opt.zero_grad()
            logits = model(_augment(p[idx], gen), f[idx])
            loss = (
                F.binary_cross_entropy_with_logits(logits, y[idx], reduction="none") * w[idx]
            ).sum() / w[idx].sum()
            loss.backward()
            opt.step()
            total += loss.item() * len(idx)
        print(f"    epoch {epoch}: loss {total / len(y):.4f}", flush=True)
    return model.eval()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--real",
        type=Path,
        required=True,
        help="folder of training.real_negatives / training.real_inserted .npz files",
    )
    ap.add_argument(
        "--cache", type=Path, required=True, help="phantom cache (as train_fp_reduction's)"
    )
    ap.add_argument("--start", type=Path, default=WEIGHTS, help="weights card to start from")
    ap.add_argument("--phantom-seeds", default="1000-1007")
    ap.add_argument("--val-seeds", default="1064-1071")
    ap.add_argument("--nodules", type=int, default=12)
    ap.add_argument(
        "--juxtavascular",
        type=float,
        default=0.3,
        help="share of training-phantom nodules on a vessel",
    )
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--real-weight", type=float, default=1.0, help="loss weight of a real negative")
    ap.add_argument(
        "--real-pos-weight", type=float, default=3.0, help="loss weight of a real positive"
    )
    ap.add_argument(
        "--exclude",
        action="append",
        default=[],
        help="leave out real scans whose name contains this (cross-validation folds; repeatable)",
    )
    ap.add_argument(
        "--pos-weight", type=float, default=5.0, help="loss weight of a phantom positive"
    )
    ap.add_argument(
        "--threshold", type=float, help="operating threshold (default: the starting card's)"
    )
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--name", default="lung_nodules_fp_v2")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    train_seeds, val_seeds = _seeds(args.phantom_seeds), _seeds(args.val_seeds)
    if any(s >= RESERVED_SEEDS for s in train_seeds + val_seeds) or set(train_seeds) & set(
        val_seeds
    ):
        ap.error("phantom seeds overlap, or reach the benchmark's (>= 9000)")
    started = time.time()
    args.cache.mkdir(parents=True, exist_ok=True)
    start = FpReducer.load(args.start)
    try:  # validation reads the scored candidates: input QC must not skip a phantom
        detector = LungNoduleDetector(
            device="cpu", weights=args.start, options={"outside_range": "qualify"}
        )
    except ValueError:
        detector = LungNoduleDetector(device="cpu", weights=args.start)

    print("real hard negatives", flush=True)
    rp, rf, rl, real_names = real_set(args.real, args.exclude)
    print("phantoms", flush=True)
    pp, pf, pl = phantom_set(
        detector, start, train_seeds, args.cache, args.nodules, args.juxtavascular
    )
    patches = torch.cat([pp, rp])
    feats = np.concatenate([pf, rf])
    labels = np.concatenate([pl, rl])
    weights = np.concatenate(
        [
            np.where(pl > 0, args.pos_weight, 1.0),
            np.where(rl > 0, args.real_pos_weight, args.real_weight),
        ]
    )
    print(
        f"  {len(labels)} patches: {int(pl.sum())} phantom positives, {int((pl == 0).sum())} phantom "
        f"negatives, {int(rl.sum())} real positives, {int((rl == 0).sum())} real negatives",
        flush=True,
    )

    members = []
    for n, model in enumerate(start.stage2):
        print(f"  stage-2 model {n + 1}/{len(start.stage2)}", flush=True)
        members.append(
            finetune(model, patches, feats, labels, weights, epochs=args.epochs, lr=args.lr, seed=n)
        )
    reducer = FpReducer(
        start.stage1,
        members,
        FEATURE_NAMES,
        top_k=start.top_k,
        threshold=start.threshold,
        card=start.card,
    )

    print("validation", flush=True)
    f_all, f_solid = validate(detector, reducer, val_seeds, args.cache, args.nodules)
    print(
        f"  all >= 4 mm: {f_all['sensitivity_at']}\n  solid >= 5 mm: {f_solid['sensitivity_at']}",
        flush=True,
    )

    args.out.mkdir(parents=True, exist_ok=True)
    pt = args.out / f"{args.name}.pt"
    torch.save(
        {"stage1": start.stage1.state_dict(), "stage2": [m.state_dict() for m in members]}, pt
    )
    digest = hashlib.sha256(pt.read_bytes()).hexdigest()
    card: dict[str, Any] = {
        k: v
        for k, v in start.card.items()
        if k not in ("training", "validation", "validation_first_model_alone")
    }
    card.update(
        {
            "file": pt.name,
            "sha256": digest,
            "version": f"{time.strftime('%Y%m%d')}-{digest[:8]}",
            "threshold": round(
                float(args.threshold if args.threshold is not None else start.threshold), 5
            ),
            "threshold_rule": "the starting card's threshold"
            if args.threshold is None
            else "set by hand (--threshold)",
            "training": {
                "command": "python -m training.finetune_real "
                + " ".join(argv if argv is not None else sys.argv[1:]),
                "started_from": f"{args.start.name} (sha256 {start.sha256})",
                "stage1": "unchanged",
                "real_scans": real_names,
                "real_negatives": int((rl == 0).sum()),
                "real_positives": int(rl.sum()),
                "real_positive_weight": args.real_pos_weight,
                "real_held_out": list(HELD_OUT),
                "phantom_seeds": args.phantom_seeds,
                "juxtavascular_share": args.juxtavascular,
                "phantom_patches": len(pl),
                "phantom_positive": int(pl.sum()),
                "epochs": args.epochs,
                "lr": args.lr,
                "real_weight": args.real_weight,
                "pos_weight": args.pos_weight,
                "torch": torch.__version__,
                "minutes": round((time.time() - started) / 60, 1),
            },
            "validation": {
                "scans": len(val_seeds),
                "val_seeds": args.val_seeds,
                "all_ge_4mm": {k: v for k, v in f_all.items() if k != "curve"},
                "solid_ge_5mm": {k: v for k, v in f_solid.items() if k != "curve"},
            },
        }
    )
    (args.out / f"{args.name}.json").write_text(json.dumps(card, indent=2) + "\n")
    print(f"wrote {pt} (sha256 {digest[:16]}...)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
