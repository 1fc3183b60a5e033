"""Artifact tagging with a TopK sparse autoencoder on image embeddings.

    sae, history = train_sae(emb_ND, n_latents=4096, k=32, steps=4000, embedding=embedder.meta())
    tagger = fit_tagger(sae, emb_ND, labelled={"jpeg": m1, "noise": m2, "motion blur": m3}, clean=m0,
                        defects=["jpeg", "noise"], styles=["motion blur"])
    drop_N, score_N, reason_N = tagger.decide(emb_ND, meta)

Krea 2 removes real defects (compression, noise, watermarks) without throwing away motion
blur or shallow depth of field, which a quality classifier tends to lump with them. An SAE
splits each embedding into a few directions; a handful of labelled examples names the
latents each defect and each style lights up, and the filter drops only images whose
defect latents fire. A latent that also serves a style is never a defect latent.

The SAE follows Gao et al. 2024 ("Scaling and evaluating sparse autoencoders"):

    z = TopK_k(W_enc (x - b_pre) + b_enc)        exactly k latents per row (no ReLU: L0 = k)
    x_hat = W_dec z + b_pre                      W_dec's columns unit norm
    loss = |x - x_hat|^2 / V + aux_coef * |e - e_hat|^2 / V

x is the embedding standardised per dimension (TopKSAE says why) and V its total variance,
so the first term is the normalised MSE (NMSE: 1 is the error of predicting the mean).
AuxK: e = x - x_hat (no gradient), e_hat = W_dec z_aux, z_aux the top k_aux pre-activations
among the dead latents (those not selected for `dead_steps` steps), signed as z is; it gives
dead latents, which the first term never reaches, a gradient toward what the live ones miss.
(Measured on planted data: with z_aux through a ReLU, AuxK did not lower the dead count;
signed, it cuts the latents that never fire from 6-8 of 384 to 1-2, tests/data/test_sae.py.)
b_pre starts at the geometric median of the data, W_enc at W_dec's transpose. After every
step the decoder's gradient along its own columns is removed and the columns renormalised.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from data.embeddings import check_embedding_meta, check_width, load_tensors, save_tensors

SAE_FORMAT = "k2-topk-sae-1"
TAGGER_FORMAT = "k2-defect-tagger-1"
_ROWS = 8192  # rows per encoder call at inference: the (rows, n_latents) pre-activations bound memory


@dataclass
class SAEConfig:
    n_latents: int
    k: int = 32
    k_aux: int | None = None        # None: half the embedding width (the paper's d/2), at most n_latents
    aux_coef: float = 1 / 32
    dead_steps: int = 200           # steps without being selected before a latent counts as dead
    steps: int = 2000
    batch_size: int = 1024
    lr: float = 1e-3
    seed: int = 0
    standardize: bool = True        # z-score each embedding dimension first (see TopKSAE)


class TopKSAE(nn.Module):
    """The autoencoder (module docstring). `embedding`: the meta of the embeddings it was
    trained on (model, version, dim), checked by the tagger; None for planted data.

    It works on standardised embeddings z = (x - x_mean) / x_std (buffers; identity unless
    config.standardize): an image tower's embedding varies mostly with content, and the
    quality signal lives in directions of small variance (measured with the tiny random
    tower: a JPEG or noise copy moves a unit embedding by 0.02-0.04) that an SAE on raw
    embeddings spends no latent on. pre_activations, decode and forward take and give z;
    encode_topk, encode and nmse take embeddings."""

    def __init__(self, dim: int, config: SAEConfig, embedding: dict | None = None):
        super().__init__()
        if not 1 <= config.k <= config.n_latents:
            raise ValueError(f"k must lie in [1, n_latents = {config.n_latents}], got {config.k}")
        self.config = config
        self.embedding = {"model": None, "version": None, "dim": dim, **(embedding or {})}
        self.b_pre = nn.Parameter(torch.zeros(dim))
        self.W_enc = nn.Parameter(torch.zeros(config.n_latents, dim))
        self.b_enc = nn.Parameter(torch.zeros(config.n_latents))
        self.W_dec = nn.Parameter(torch.zeros(dim, config.n_latents))
        self.register_buffer("x_mean", torch.zeros(dim))
        self.register_buffer("x_std", torch.ones(dim))

    @property
    def dim(self) -> int:
        return self.b_pre.shape[0]

    def standardise(self, emb_ND) -> torch.Tensor:
        """Embeddings (numpy or torch, (N, dim)) -> z, float32."""
        return (check_width(emb_ND, self.dim, "the sparse autoencoder") - self.x_mean) / self.x_std

    def pre_activations(self, x_ND: torch.Tensor) -> torch.Tensor:
        return (x_ND - self.b_pre) @ self.W_enc.T + self.b_enc

    def decode(self, codes_NL: torch.Tensor) -> torch.Tensor:
        return codes_NL @ self.W_dec.T + self.b_pre

    def forward(self, x_ND: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(x_hat, dense codes (N, L) with k nonzeros per row, pre-activations)."""
        pre = self.pre_activations(x_ND)
        values, indices = pre.topk(self.config.k, dim=1)
        codes = torch.zeros_like(pre).scatter(1, indices, values)
        return self.decode(codes), codes, pre

    @torch.no_grad()
    def encode_topk(self, emb_ND) -> tuple[torch.Tensor, torch.Tensor]:
        """(values (N, k), latent indices (N, k)) of every row, in row blocks."""
        x = self.standardise(emb_ND)
        parts = [self.pre_activations(x[i:i + _ROWS]).topk(self.config.k, dim=1) for i in range(0, len(x), _ROWS)]
        return torch.cat([p.values for p in parts]), torch.cat([p.indices for p in parts])

    def encode(self, emb_ND) -> torch.Tensor:
        """Dense codes (N, n_latents), k nonzeros per row."""
        values, indices = self.encode_topk(emb_ND)
        return torch.zeros(len(values), self.config.n_latents).scatter_(1, indices, values)

    @torch.no_grad()
    def nmse(self, emb_ND) -> float:
        """|z - z_hat|^2 summed over rows, over |z - mean(z)|^2 summed (z: the standardised rows)."""
        x = self.standardise(emb_ND)
        error = sum(((x[i:i + _ROWS] - self(x[i:i + _ROWS])[0]) ** 2).sum().item() for i in range(0, len(x), _ROWS))
        return error / ((x - x.mean(0)) ** 2).sum().item()

    def tensors(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in self.state_dict().items()}

    def meta(self) -> dict:
        return {"config": asdict(self.config), "embedding": self.embedding}

    def save(self, path: str | os.PathLike) -> Path:
        return save_tensors(path, self.tensors(), {"format": SAE_FORMAT, **self.meta()})

    @classmethod
    def from_saved(cls, tensors: dict, meta: dict, where: str) -> "TopKSAE":
        try:
            config = SAEConfig(**meta["config"])
            sae = cls(int(meta["embedding"]["dim"]), config, meta["embedding"])
            sae.load_state_dict({k: torch.from_numpy(v) for k, v in tensors.items()})
        except (KeyError, TypeError, ValueError, RuntimeError) as e:
            raise ValueError(f"{where} is damaged ({type(e).__name__}: {e})") from e
        return sae.requires_grad_(False)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "TopKSAE":
        tensors, meta = load_tensors(path, "sparse autoencoder")
        if meta.get("format") != SAE_FORMAT:
            raise ValueError(f"sparse autoencoder {path} has format {meta.get('format')!r}, not {SAE_FORMAT!r}")
        return cls.from_saved(tensors, meta, f"sparse autoencoder {path}")


def geometric_median(x_ND: torch.Tensor, iters: int = 20) -> torch.Tensor:
    """Weiszfeld's iteration from the mean: the point minimising the summed distances."""
    m = x_ND.mean(0)
    for _ in range(iters):
        w = 1 / (x_ND - m).norm(dim=1).clamp_min(1e-8)
        m = (w[:, None] * x_ND).sum(0) / w.sum()
    return m


def train_sae(emb_ND, n_latents: int, k: int = 32, steps: int = 2000, *, k_aux: int | None = None,
              aux_coef: float = 1 / 32, dead_steps: int = 200, batch_size: int = 1024, lr: float = 1e-3,
              seed: int = 0, standardize: bool = True, embedding: dict | None = None, log_every: int = 100,
              progress: Callable[[str], None] | None = None) -> tuple[TopKSAE, list[dict]]:
    """A TopK SAE on the rows of `emb_ND` (module docstring), standardised first unless
    `standardize` is False (see TopKSAE); minibatches drawn with `seed`.
    history: at step 0, every `log_every` steps and the last, {"step", "nmse" (on up to 8192
    rows), "dead_fraction" (latents not selected for dead_steps steps), "aux_loss"}."""
    raw = check_width(emb_ND, int(np.shape(emb_ND)[1]), "train_sae")
    n, d = raw.shape
    config = SAEConfig(n_latents, k, k_aux, aux_coef, dead_steps, steps, batch_size, lr, seed, standardize)
    k_aux = min(n_latents, k_aux if k_aux is not None else max(d // 2, 1))
    g = torch.Generator().manual_seed(seed)
    sae = TopKSAE(d, config, embedding)
    if standardize:
        sae.x_mean.copy_(raw.mean(0))
        sae.x_std.copy_(raw.std(0).clamp_min(1e-6))
    x = sae.standardise(raw)
    with torch.no_grad():
        w = torch.randn(d, n_latents, generator=g)
        sae.W_dec.copy_(w / w.norm(dim=0))
        sae.W_enc.copy_(sae.W_dec.T)
        sae.b_pre.copy_(geometric_median(x[torch.randperm(n, generator=g)[:8192]]))
    variance = ((x - x.mean(0)) ** 2).sum(1).mean()  # V: total variance per row
    probe = raw[torch.randperm(n, generator=g)[:8192]]
    opt = torch.optim.Adam(sae.parameters(), lr=lr, eps=6.25e-10)
    since_fired = torch.zeros(n_latents, dtype=torch.long)
    history: list[dict] = []
    aux_loss = torch.zeros(())

    def log(step: int) -> None:
        row = {"step": step, "nmse": sae.nmse(probe), "dead_fraction": (since_fired > dead_steps).float().mean().item(),
               "aux_loss": aux_loss.item()}
        history.append(row)
        if progress:
            progress(f"step {step}/{steps} | nmse {row['nmse']:.4f} | dead {100 * row['dead_fraction']:.1f}% | "
                     f"aux {row['aux_loss']:.4f}")

    log(0)
    order, cursor = torch.randperm(n, generator=g), 0
    for step in range(1, steps + 1):
        if cursor + batch_size > n:
            order, cursor = torch.randperm(n, generator=g), 0
        xb = x[order[cursor:cursor + batch_size]]
        cursor += batch_size
        x_hat, codes, pre = sae(xb)
        residual = xb - x_hat
        loss = (residual ** 2).sum(1).mean() / variance
        selected = torch.zeros(n_latents, dtype=torch.bool)
        selected[codes.nonzero()[:, 1]] = True
        since_fired += 1
        since_fired[selected] = 0
        dead = since_fired > dead_steps
        aux_loss = torch.zeros(())
        if aux_coef > 0 and dead.any():
            values, indices = pre.masked_fill(~dead, -math.inf).topk(min(k_aux, int(dead.sum())), dim=1)
            e_hat = torch.zeros_like(pre).scatter(1, indices, values) @ sae.W_dec.T
            aux_loss = ((residual.detach() - e_hat) ** 2).sum(1).mean() / variance
            loss = loss + aux_coef * aux_loss
        opt.zero_grad()
        loss.backward()
        with torch.no_grad():
            # a step along a unit column's own direction only changes its norm, which the
            # renormalisation below undoes: remove it, so Adam's state does not carry it
            sae.W_dec.grad -= (sae.W_dec.grad * sae.W_dec).sum(0) * sae.W_dec
        opt.step()
        with torch.no_grad():
            sae.W_dec /= sae.W_dec.norm(dim=0)
        if step % log_every == 0 or step == steps:
            log(step)
    return sae.requires_grad_(False), history


def firing_rates(codes_NL: torch.Tensor) -> torch.Tensor:
    """Per latent, the fraction of rows where it fires (a positive activation)."""
    return (codes_NL > 0).float().mean(0)


def name_latents(codes_NL, labelled: dict[str, np.ndarray], clean: np.ndarray | None = None, min_rate: float = 0.2,
                 min_lift: float = 4.0, coverage: float = 0.95, max_latents: int = 4,
                 exclude: set[int] | frozenset = frozenset()) -> dict[str, list[int]]:
    """For each label, the latents that fire far more on its examples (mask `labelled[label]`)
    than on clean ones (`clean`, default: rows in no mask): a firing rate of at least
    `min_rate` on the label and `min_lift` times the clean rate (both smoothed by one
    example). Taken greedily by rate difference while each adds coverage, until `coverage`
    of the label's examples have one firing or `max_latents` are taken; latents in `exclude`
    are passed over. [] if none qualifies."""
    codes = torch.as_tensor(codes_NL)
    masks = {name: torch.as_tensor(np.asarray(m, bool)) for name, m in labelled.items()}
    for name, m in masks.items():
        if m.shape != (len(codes),) or not m.any():
            raise ValueError(f"label {name!r}: a boolean mask over the {len(codes)} rows with at least one "
                             f"example is needed, got shape {tuple(m.shape)} with {int(m.sum())}")
    clean_mask = torch.as_tensor(np.asarray(clean, bool)) if clean is not None else \
        ~torch.stack(list(masks.values())).any(0)
    if not clean_mask.any():
        raise ValueError("naming latents needs clean examples (rows in no label, or `clean`)")
    clean_rate = (firing_rates(codes[clean_mask]) * clean_mask.sum() + 1) / (clean_mask.sum() + 1)
    named = {}
    for name, m in masks.items():
        fires = codes[m] > 0
        rate = (fires.float().sum(0) + 1) / (m.sum() + 1)
        ok = (fires.float().mean(0) >= min_rate) & (rate >= min_lift * clean_rate)
        ok[list(exclude)] = False
        chosen, covered = [], torch.zeros(int(m.sum()), dtype=torch.bool)
        for latent in sorted(ok.nonzero()[:, 0].tolist(), key=lambda j: -(rate[j] - clean_rate[j]).item()):
            if len(chosen) == max_latents or covered.float().mean() >= coverage:
                break
            if (fires[:, latent] & ~covered).any():
                chosen.append(latent)
                covered |= fires[:, latent]
        named[name] = chosen
    return named


# ---- the defect filter ------------------------------------------------------------------------
class DefectTagger:
    """Drops images whose defect latents fire above their thresholds; style latents are
    tagged, never dropped. latents / thresholds: {label: [latent, ...]} / {label: [t, ...]}."""

    def __init__(self, sae: TopKSAE, latents: dict[str, list[int]], thresholds: dict[str, list[float]],
                 defects: list[str], styles: list[str], report: dict | None = None, path: Path | None = None):
        unknown = sorted((set(defects) | set(styles)) - set(latents))
        if unknown or set(defects) & set(styles):
            raise ValueError(f"defects {defects} and styles {styles} must be disjoint labels of {sorted(latents)}")
        if any(len(latents[k]) != len(thresholds.get(k, ())) for k in latents):
            raise ValueError("every named latent needs one threshold")
        self.sae = sae
        self.latents = {k: [int(j) for j in v] for k, v in latents.items()}
        self.thresholds = {k: [float(t) for t in v] for k, v in thresholds.items()}
        self.defects, self.styles = list(defects), list(styles)
        self.report = dict(report or {})
        self.path = path

    @property
    def embedding(self) -> dict:
        return self.sae.embedding

    def _where(self) -> str:
        return f"defect tagger {self.path}" if self.path else "defect tagger"

    def check(self, meta: dict) -> None:
        """ValueError unless `meta` names the SAE's embedding model, version and width."""
        if self.embedding["model"] is not None:
            check_embedding_meta(self.embedding, meta, self._where())

    def margins(self, emb_ND) -> dict[str, torch.Tensor]:
        """{label: (N,) the highest activation - threshold over the label's latents} (-inf where
        the label has no latents)."""
        check_width(emb_ND, self.sae.dim, self._where())
        values, indices = self.sae.encode_topk(emb_ND)
        out = {}
        for label, latents in self.latents.items():
            best = torch.full((len(values),), -math.inf)
            for latent, t in zip(latents, self.thresholds[label]):
                activation = (values * (indices == latent)).sum(1)
                best = torch.maximum(best, activation - t)
            out[label] = best
        return out

    def tags(self, emb_ND) -> dict[str, np.ndarray]:
        """{label: (N,) bool, a latent of the label fires above its threshold}, defects and styles."""
        return {label: (m > 0).numpy() for label, m in self.margins(emb_ND).items()}

    def decide(self, emb_ND, meta: dict | None = None) -> tuple[np.ndarray, np.ndarray, list[str]]:
        """(drop_N bool, score_N float32: the highest defect margin, reason_N: the defect label
        of that margin for dropped rows, "" for kept ones). `meta` is checked first if given."""
        if meta is not None:
            self.check(meta)
        margins = self.margins(emb_ND)
        n = len(next(iter(margins.values()))) if margins else len(emb_ND)
        if not self.defects:
            return np.zeros(n, bool), np.full(n, -np.inf, np.float32), [""] * n
        stacked = torch.stack([margins[d] for d in self.defects])
        score, which = stacked.max(0)
        drop = (score > 0).numpy()
        reasons = [self.defects[w] if dropped else "" for w, dropped in zip(which.tolist(), drop)]
        return drop, score.numpy().astype(np.float32), reasons

    def save(self, path: str | os.PathLike) -> Path:
        meta = {"format": TAGGER_FORMAT, **self.sae.meta(), "latents": self.latents, "thresholds": self.thresholds,
                "defects": self.defects, "styles": self.styles, "report": self.report}
        return save_tensors(path, self.sae.tensors(), meta)

    @classmethod
    def load(cls, path: str | os.PathLike, expect: dict | None = None) -> "DefectTagger":
        """The tagger at `path`; ValueError naming it if missing or damaged, or, where `expect`
        (embedding meta) is given, made for other embeddings."""
        path = Path(path)
        tensors, meta = load_tensors(path, "defect tagger")
        where = f"defect tagger {path}"
        if meta.get("format") != TAGGER_FORMAT:
            raise ValueError(f"{where} has format {meta.get('format')!r}, not {TAGGER_FORMAT!r}")
        sae = TopKSAE.from_saved(tensors, meta, where)
        try:
            tagger = cls(sae, meta["latents"], meta["thresholds"], meta["defects"], meta["styles"], meta["report"],
                         path=path)
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{where} is damaged ({type(e).__name__}: {e})") from e
        if expect is not None:
            tagger.check(expect)
        return tagger


def fit_tagger(sae: TopKSAE, emb_ND, labelled: dict[str, np.ndarray], clean: np.ndarray, defects: list[str],
               styles: list[str], keep_quantile: float = 0.99, **naming) -> DefectTagger:
    """A DefectTagger from labelled examples: rows of `emb_ND` under each label's mask, and
    `clean` rows. Latents are named per label (name_latents, `naming` its options), the
    styles' first: a latent named for any style is never a defect latent.

    A defect latent's threshold lies between the groups it must pass and its own examples:
    kept_high, the highest `keep_quantile` of its activation over each group to keep (the
    clean rows, and each style's examples, taken apart so a small style is not outvoted by
    the clean rows), and own_low, the 1 - keep_quantile quantile over the label's examples
    where it fires.
    With a gap, its midpoint: a few labelled examples see little of either tail, and the
    midpoint leaves room for both; without one, kept_high (keeping wins). A style latent's:
    the same, with the clean rows the only group to keep.

    report: per label, its latents and the fractions of its labelled examples tagged and
    dropped, and the fraction of the clean rows dropped."""
    codes = sae.encode(emb_ND)
    clean = np.asarray(clean, bool)
    for label in [*defects, *styles]:
        if label not in labelled:
            raise ValueError(f"label {label!r} has no examples in `labelled` ({sorted(labelled)})")
    # styles first: a defect's greedy choice must not spend its coverage on a style's latent
    named = name_latents(codes, {s: labelled[s] for s in styles}, clean, **naming) if styles else {}
    style_latents = {j for s in styles for j in named[s]}
    named.update(name_latents(codes, {d: labelled[d] for d in defects}, clean, exclude=style_latents, **naming))
    kept_groups = [clean] + [np.asarray(labelled[s], bool) for s in styles if s in labelled]
    latents, thresholds = {}, {}
    for label in [*defects, *styles]:
        groups = kept_groups if label in defects else [clean]
        own = torch.from_numpy(np.asarray(labelled[label], bool))
        latents[label] = named[label]
        thresholds[label] = []
        for j in latents[label]:
            kept_high = max([0.0] + [float(torch.quantile(codes[torch.from_numpy(rows), j], keep_quantile))
                                     for rows in groups])
            fired = codes[own, j][codes[own, j] > 0]  # a latent may cover part of its label
            own_low = float(torch.quantile(fired, 1 - keep_quantile)) if len(fired) else 0.0
            thresholds[label].append((kept_high + own_low) / 2 if own_low > kept_high else kept_high)
    tagger = DefectTagger(sae, latents, thresholds, defects, styles)
    tags = tagger.tags(emb_ND)
    drop = tagger.decide(emb_ND)[0]
    tagger.report = {"labels": {label: {"latents": latents[label],
                                        "tagged": float(tags[label][np.asarray(labelled[label], bool)].mean()),
                                        "dropped": float(drop[np.asarray(labelled[label], bool)].mean())}
                                for label in latents},
                     "clean_dropped": float(drop[clean].mean()), "keep_quantile": keep_quantile}
    return tagger
