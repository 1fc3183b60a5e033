"""The synthetic-image filter: a probe on image embeddings that scores P(generated).

    probe = train_probe(emb_ND, labels_N, embedder.meta(), ProbeConfig(target_recall=0.95))
    probe.report        # held-out recall and false-positive rate at the chosen threshold
    probe.save(path); probe = SyntheticImageProbe.load(path, expect=embedder.meta())
    drop_N, scores_N = probe.decide(emb_ND, meta)

Krea 2 keeps AI-generated images out of pretraining with classifiers on DINOv3 and SigLIP-2
features. Generated images leave a fingerprint in such features that a linear read-out
finds; `hidden` > 0 gives a one-hidden-layer MLP for fingerprints that are not linear.
Labels: 0 real, 1 generated. Training is full-batch Adam on standardised embeddings with
each class weighing half the loss (generated examples are usually the scarce class).

The threshold is the filter's real decision, chosen on a held-out split the probe never
trained on: of the thresholds that still catch `target_recall` of the held-out generated
images, the one that drops the fewest real ones (choose_threshold). A filter that misses
generated images fails quietly, so recall is the constraint and false positives the cost.

The saved file records the embedding model's name, version and width; scoring embeddings
of another model or width is refused, since a probe read off one tower means nothing on
another's features.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from data.embeddings import check_embedding_meta, check_width, load_tensors, save_tensors

FORMAT = "k2-synthetic-probe-1"


@dataclass
class ProbeConfig:
    hidden: int = 0                 # 0: logistic regression; > 0: an MLP with one GELU layer this wide
    steps: int = 500                # full-batch Adam steps
    lr: float = 0.02
    weight_decay: float = 1e-3      # L2 on the weights, added to the mean class-balanced BCE
    heldout_fraction: float = 0.25  # of each class, for the threshold and the report
    target_recall: float = 0.95     # of generated images, on the held-out split
    seed: int = 0                   # the split and the MLP's initial weights


def choose_threshold(scores_N, labels_N, target_recall: float) -> float:
    """The threshold t (an image is dropped when score >= t) that drops the fewest real
    images (label 0) among those that drop at least `target_recall` of the generated ones
    (label 1), and of those the one that drops the most generated images.

    Both counts fall as t rises. The highest t keeping the recall is the k-th highest
    generated score (k = ceil(target_recall * #generated)); t can come down, dropping no
    more real images, to just above the highest real score r below it. The midpoint of r
    and the lowest generated score above r leaves room on both sides for unseen images."""
    scores, labels = np.asarray(scores_N, np.float64), np.asarray(labels_N)
    if not 0.0 < target_recall <= 1.0:
        raise ValueError(f"target_recall must lie in (0, 1], got {target_recall}")
    if scores.shape != labels.shape or scores.ndim != 1:
        raise ValueError(f"scores and labels must be matching 1-d arrays, got {scores.shape} and {labels.shape}")
    generated, real = scores[labels == 1], scores[labels == 0]
    if not len(generated):
        raise ValueError("choosing a threshold needs generated (label 1) examples")
    k = math.ceil(target_recall * len(generated) - 1e-9)
    highest = np.sort(generated)[::-1][k - 1]
    real_below = real[real < highest]
    if not len(real_below):  # every real image scores at least `highest`: all are dropped anyway
        return float(generated.min())
    r = real_below.max()
    g = generated[generated > r].min()
    t = (r + g) / 2
    return float(t if t > r else g)


def detection_rates(scores_N, labels_N, threshold: float) -> dict:
    """Recall (generated dropped) and false-positive rate (real dropped) at `threshold`."""
    scores, labels = np.asarray(scores_N), np.asarray(labels_N)
    drop = scores >= threshold
    gen, real = labels == 1, labels == 0
    return {"recall": float(drop[gen].mean()) if gen.any() else float("nan"),
            "false_positive_rate": float(drop[real].mean()) if real.any() else float("nan"),
            "num_generated": int(gen.sum()), "num_real": int(real.sum())}


def _logits(params: dict[str, torch.Tensor], x_ND: torch.Tensor) -> torch.Tensor:
    z = (x_ND - params["mean"]) / params["std"]
    if "w1" in params:
        z = F.gelu(z @ params["w1"] + params["b1"])
    return z @ params["w"] + params["b"]


class SyntheticImageProbe:
    """P(generated) of image embeddings and the drop decision at `threshold` (module docstring)."""

    def __init__(self, params: dict[str, torch.Tensor], embedding: dict, threshold: float,
                 config: ProbeConfig, report: dict | None = None, path: Path | None = None):
        self.params = {k: torch.as_tensor(v).float() for k, v in params.items()}
        self.embedding = {k: embedding[k] for k in ("model", "version", "dim")}
        self.threshold = float(threshold)
        self.config = config
        self.report = dict(report or {})
        self.path = path
        dim = self.embedding["dim"]
        if self.params["mean"].shape != (dim,):
            raise ValueError(f"{self._where()}: a probe for {dim}-d embeddings needs mean ({dim},), "
                             f"got {tuple(self.params['mean'].shape)}")

    def _where(self) -> str:
        return f"synthetic-image probe {self.path}" if self.path else "synthetic-image probe"

    def check(self, meta: dict) -> None:
        """ValueError unless `meta` (an embedder's or the store's) names this probe's model,
        version and width."""
        check_embedding_meta(self.embedding, meta, self._where())

    @torch.no_grad()
    def scores(self, emb_ND) -> np.ndarray:
        """P(generated) per row, float32 (N,)."""
        x = check_width(emb_ND, self.embedding["dim"], self._where())
        return torch.sigmoid(_logits(self.params, x)).numpy()

    def decide(self, emb_ND, meta: dict | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(drop_N: bool, scores_N: float32 P(generated)); an image is dropped when its score
        reaches the threshold. `meta`, where given, is checked first (see check)."""
        if meta is not None:
            self.check(meta)
        scores = self.scores(emb_ND)
        return scores >= self.threshold, scores

    def save(self, path: str | os.PathLike) -> Path:
        """One safetensors file (weights; config, embedding, threshold and report in its header),
        written atomically."""
        meta = {"format": FORMAT, "embedding": self.embedding, "threshold": self.threshold,
                "config": asdict(self.config), "report": self.report}
        return save_tensors(path, self.params, meta)

    @classmethod
    def load(cls, path: str | os.PathLike, expect: dict | None = None) -> "SyntheticImageProbe":
        """The probe saved at `path`; ValueError naming it if missing or damaged, or, where
        `expect` (embedding meta) is given, made for other embeddings."""
        path = Path(path)
        tensors, meta = load_tensors(path, "synthetic-image probe")
        try:
            if meta["format"] != FORMAT:
                raise ValueError(f"format {meta['format']!r}, not {FORMAT!r}")
            probe = cls(tensors, meta["embedding"], meta["threshold"], ProbeConfig(**meta["config"]),
                        meta["report"], path=path)
            _check_params(probe.params, probe.config.hidden)
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"synthetic-image probe {path} is damaged ({type(e).__name__}: {e})") from e
        if expect is not None:
            probe.check(expect)
        return probe


def _check_params(params: dict[str, torch.Tensor], hidden: int) -> None:
    d = params["mean"].shape[0]
    width = hidden or d
    want = {"mean": (d,), "std": (d,), "w": (width,), "b": ()}
    if hidden:
        want.update(w1=(d, hidden), b1=(hidden,))
    got = {k: tuple(v.shape) for k, v in params.items()}
    if got != want:
        raise ValueError(f"weights {got}, expected {want}")


def split_heldout(labels_N: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train, held-out) row indices, sorted: `fraction` of each class held out, drawn with `seed`."""
    rng = np.random.default_rng(seed)
    train, held = [], []
    for c in (0, 1):
        rows = rng.permutation(np.flatnonzero(labels_N == c))
        n = int(round(len(rows) * fraction))
        if n < 1 or n == len(rows):
            raise ValueError(f"class {c} has {len(rows)} examples: too few to hold out {fraction} of them and "
                             f"train on the rest")
        held.append(rows[:n])
        train.append(rows[n:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(held))


def fit_probe(x_ND: torch.Tensor, y_N: torch.Tensor, config: ProbeConfig,
              progress: Callable[[str], None] | None = None) -> dict[str, torch.Tensor]:
    """The probe's weights on (x, y): standardisation of x, then full-batch Adam on the
    class-balanced BCE. Zero init for the linear probe and a seeded init for the MLP: the
    same data and config give the same weights."""
    mean, std = x_ND.mean(0), x_ND.std(0).clamp_min(1e-6)
    d = x_ND.shape[1]
    g = torch.Generator().manual_seed(config.seed)
    params = {"mean": mean, "std": std}
    if config.hidden:
        params["w1"] = (torch.randn(d, config.hidden, generator=g) / math.sqrt(d)).requires_grad_()
        params["b1"] = torch.zeros(config.hidden, requires_grad=True)
        params["w"] = (torch.randn(config.hidden, generator=g) / math.sqrt(config.hidden)).requires_grad_()
    else:
        params["w"] = torch.zeros(d, requires_grad=True)
    params["b"] = torch.zeros((), requires_grad=True)
    trained = [v for k, v in params.items() if k not in ("mean", "std")]
    # each class weighs half the loss, whatever their counts
    weight = torch.where(y_N == 1, 0.5 / (y_N == 1).sum(), 0.5 / (y_N == 0).sum())
    opt = torch.optim.Adam(trained, lr=config.lr)
    for step in range(config.steps):
        opt.zero_grad()
        bce = F.binary_cross_entropy_with_logits(_logits(params, x_ND), y_N, reduction="none")
        l2 = sum((params[k] ** 2).sum() for k in ("w", "w1") if k in params)
        loss = (weight * bce).sum() + 0.5 * config.weight_decay * l2
        loss.backward()
        opt.step()
        if progress and (step + 1) % 100 == 0:
            progress(f"  step {step + 1}/{config.steps} | loss {loss.item():.4f}")
    return {k: v.detach() for k, v in params.items()}


def train_probe(emb_ND, labels_N, embedding: dict, config: ProbeConfig | None = None,
                progress: Callable[[str], None] | None = None) -> SyntheticImageProbe:
    """A probe trained on the non-held-out rows of `emb_ND` (labels 0 real, 1 generated), its
    threshold chosen on the held-out rows for config.target_recall. `embedding`: the
    embedder's or the store's meta (model, version, dim). report: the held-out recall,
    false-positive rate and counts at the threshold, and the training split's."""
    config = config or ProbeConfig()
    x = check_width(emb_ND, int(embedding["dim"]), "train_probe")
    labels = np.asarray(labels_N)
    if labels.shape != (len(x),) or not np.isin(labels, (0, 1)).all():
        raise ValueError(f"labels must be 0 (real) or 1 (generated), one per embedding ({len(x)}), "
                         f"got {labels.dtype} {labels.shape}")
    train, held = split_heldout(labels, config.heldout_fraction, config.seed)
    y = torch.from_numpy(labels).float()
    params = fit_probe(x[train], y[train], config, progress)
    probe = SyntheticImageProbe(params, embedding, 0.0, config)
    scores = probe.scores(x)
    probe.threshold = choose_threshold(scores[held], labels[held], config.target_recall)
    probe.report = {"threshold": probe.threshold,
                    "heldout": detection_rates(scores[held], labels[held], probe.threshold),
                    "train": detection_rates(scores[train], labels[train], probe.threshold)}
    if progress:
        h = probe.report["heldout"]
        progress(f"held-out: recall {h['recall']:.3f} | false positives {h['false_positive_rate']:.3f} | "
                 f"threshold {probe.threshold:.4f} ({h['num_generated']} generated, {h['num_real']} real)")
    return probe
