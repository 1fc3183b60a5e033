"""The shard writer: captioned images -> tar shards of latents + text features (docs/SHARDS.md).

Work is split into chunks, a fixed number of inputs each in a deterministic order,
so each chunk can be one job of the job system:

    chunks = list_chunks("photos/", chunk_size=1000)      # cheap: lists files and tar headers (or URLs)
    write_chunk(chunks[3], "shards/", latents, encoder)   # one job; idempotent
    build_index("shards/")                                # once all chunks are done

`write_shards` does all three in one process (and `python -m data.writer` is its CLI).

Restart safety: a chunk's tar is written as `<name>.tmp` and renamed, then the done
marker `done/<chunk>.json` is written (also tmp + rename). A chunk without a marker
is rewritten from scratch under the same names, so a crash at any point neither loses
samples (the marker comes last) nor duplicates them (same keys, same file names);
build_index reads only the markers.

What is read, and how inputs are validated: data/shard_inputs.py.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import time
from collections import Counter
from dataclasses import dataclass
from itertools import groupby
from typing import Iterable, Iterator

import numpy as np
import torch
import webdataset as wds

from data.buckets import Buckets, bucket_key
from data.shard_inputs import Chunk, Reject, fetch_chunk, list_chunks, load_item

FORMAT = "k2train-shards/1"


@dataclass
class WriterConfig:
    # Target bucket area is resolution² pixels; sides are multiples of bucket_multiple
    # (at least the VAE factor x patch size) with long/short side <= max_bucket_ratio.
    resolution: int = 256
    bucket_multiple: int = 64
    max_bucket_ratio: float = 2.0
    # Rejected as absurd: short side < min_side, long side > max_side, long/short > max_aspect.
    min_side: int = 32
    max_side: int = 16384
    max_aspect: float = 4.0
    # Images per encoder call (all from one bucket, so they stack).
    micro_batch: int = 8

    def buckets(self) -> Buckets:
        return Buckets(self.resolution, self.bucket_multiple, self.max_bucket_ratio)


# ---- writing a chunk -------------------------------------------------------------------------
def _npy(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array(buf, np.ascontiguousarray(array), allow_pickle=False)
    return buf.getvalue()


def _atomic_write(path: str, data: bytes) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def latents_kind(latents) -> str:
    names = {"PixelLatents": "pixels", "QwenImageVAELatents": "qwen_image", "Flux2VAELatents": "flux2"}
    return getattr(latents, "kind", names.get(type(latents).__name__, type(latents).__name__))


def text_suffix(encoder) -> int:
    """Valid tokens that sit after the padding (Krea 2's template suffix); 0 for right padding."""
    return int(getattr(encoder, "num_suffix_tokens", 0))


def encoder_meta(latents, encoder, cfg: WriterConfig) -> dict:
    """What a chunk was encoded with; build_index refuses to mix chunks that disagree."""
    return {
        "format": FORMAT,
        "latents": {"kind": latents_kind(latents), "channels": int(latents.channels),
                    "downsample": int(latents.downsample)},
        "text": {"layers": list(encoder.layers), "dim": int(encoder.dim), "max_len": int(encoder.max_len),
                 "suffix": text_suffix(encoder),
                 "model": os.path.basename(str(getattr(encoder.model.config, "_name_or_path", "")).rstrip("/"))},
        "buckets": [list(s) for s in cfg.buckets().sizes],
    }


def valid_text(feats_TKD: torch.Tensor, mask_T: torch.Tensor, suffix: int, where: str) -> np.ndarray:
    """The n valid tokens of one prompt's features, in order, as float16 (n, K, D).

    The encoder lays a prompt out as [prompt | PAD | suffix]: the loader puts the last
    `suffix` stored tokens back at the end of its padded length, so nothing else about
    the mask needs storing. A mask of any other shape is refused.
    """
    n, T = int(mask_T.sum()), mask_T.shape[0]
    expect = torch.zeros_like(mask_T)
    expect[:n - suffix] = True
    expect[T - suffix:] = True
    if n < suffix or not torch.equal(mask_T.cpu(), expect.cpu()):
        raise ValueError(f"{where}: text mask {mask_T.int().tolist()} is not [prompt | padding | {suffix} suffix "
                         f"tokens]; cannot store only the valid tokens")
    return feats_TKD[mask_T].float().cpu().numpy().astype(np.float16)


def write_empty_text(out_dir: str, feats_nKD: np.ndarray) -> None:
    """empty_text.npy: the empty prompt's valid-token features, what caption dropout feeds the model."""
    _atomic_write(os.path.join(out_dir, "empty_text.npy"), _npy(feats_nKD.astype(np.float16)))


def _done_marker(out_dir: str, chunk_name: str) -> dict | None:
    path = os.path.join(out_dir, "done", f"{chunk_name}.json")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        marker = json.load(f)
    # A marker whose shard vanished or changed size is not done: rewrite the chunk.
    for shard in marker["shards"]:
        p = os.path.join(out_dir, shard["name"])
        if not os.path.exists(p) or os.path.getsize(p) != shard["bytes"]:
            return None
    return marker


class _HashingFile:
    """A file opened for writing that hashes every byte on its way through (a streaming
    tar needs only write), so the shard's checksum costs no second read."""

    def __init__(self, f):
        self.f, self.sha256 = f, hashlib.sha256()

    def write(self, data) -> int:
        self.sha256.update(data)
        return self.f.write(data)


def write_tar(path: str, samples: Iterable[tuple[str, dict, dict[str, np.ndarray], int]]) -> dict:
    """Write (key, record, {field: array}, bucket id) samples to the tar `path`, atomically.

    The tar is webdataset's (TarWriter): a sample is `<key>.json` and `<key>.<field>.npy`
    members, in name order, so the json comes first. Returns the shard's index entry: name,
    bytes, sha256 (hex digest of the whole file, for the loader's verify="checksum"),
    samples, max_text (most valid text tokens of a sample), members [[offset, size, bucket]].
    Bucket counts are keyed by bucket id here; write_done turns them into "HxW" names.
    """
    members, max_text = [], 0
    with open(path + ".tmp", "wb") as raw:
        f = _HashingFile(raw)
        # mtime 0 and no owner names: a rewrite of the chunk is byte-identical. The tar is
        # uncompressed, so its stream offset is the byte offset the loader seeks to.
        with wds.TarWriter(f, encoder=False, user="", group="", mode=0o644, mtime=0) as tar:
            for key, record, arrays, bucket in samples:
                offset = tar.tarstream.offset
                tar.write({"__key__": key, "json": json.dumps(record, sort_keys=True).encode(),
                           **{f"{name}.npy": _npy(array) for name, array in arrays.items()}})
                members.append([offset, tar.tarstream.offset - offset, bucket])
                max_text = max(max_text, len(arrays["text"]))
        raw.flush()
        os.fsync(raw.fileno())
    os.replace(path + ".tmp", path)
    return {"name": os.path.basename(path), "bytes": os.path.getsize(path), "sha256": f.sha256.hexdigest(),
            "samples": len(members), "max_text": max_text, "members": members}


def write_done(out_dir: str, chunk_name: str, shards: list[dict], rejects: list[dict], meta: dict,
               inputs: int, seconds: float = 0.0) -> dict:
    """The rejects file, then (last, atomically) the done marker that makes the chunk count."""
    for sub in ("done", "rejects"):
        os.makedirs(os.path.join(out_dir, sub), exist_ok=True)
    sizes = [tuple(s) for s in meta["buckets"]]
    for shard in shards:
        shard["buckets"] = dict(sorted(Counter(bucket_key(sizes[m[2]]) for m in shard["members"]).items()))
    _atomic_write(os.path.join(out_dir, "rejects", f"{chunk_name}.jsonl"),
                  "".join(json.dumps(r) + "\n" for r in rejects).encode())
    marker = {"chunk": chunk_name, "inputs": inputs, "accepted": sum(s["samples"] for s in shards),
              "rejects": len(rejects), "seconds": round(seconds, 3), "meta": meta, "shards": shards}
    _atomic_write(os.path.join(out_dir, "done", f"{chunk_name}.json"), json.dumps(marker).encode())
    return marker


def _encode_chunk(chunk: Chunk, latents, encoder, vision, cfg: WriterConfig, rejects: list[dict],
                  repa_meta: dict) -> Iterator[tuple[str, dict, dict[str, np.ndarray], int]]:
    buckets, suffix = cfg.buckets(), text_suffix(encoder)
    # Pass 1: validate every input and assign its bucket. Decoded pixels are dropped and
    # decoded again in pass 2, so a chunk of thousands of large photos fits in memory.
    accepted = []
    for pos, item in enumerate(chunk.items):
        try:
            image, _, _ = load_item(item, cfg)
            accepted.append((buckets.assign(image.height, image.width), pos))
        except Reject as e:
            rejects.append({"source": item.key, "position": pos, "reason": str(e)})

    # Pass 2: same-bucket micro-batches (so images stack) through the encoders.
    batches = []
    for _, same in groupby(sorted(accepted), key=lambda a: a[0]):
        same = list(same)
        batches += [same[s:s + cfg.micro_batch] for s in range(0, len(same), cfg.micro_batch)]
    for group in batches:
        bucket = group[0][0]
        bh, bw = buckets[bucket]
        loaded = [load_item(chunk.items[p], cfg) for _, p in group]
        pixels_BHWC = np.stack([np.asarray(buckets.resize_crop(img, bucket)) for img, _, _ in loaded])
        images_BCHW = torch.from_numpy(pixels_BHWC).permute(0, 3, 1, 2).float() / 127.5 - 1.0
        lat_BChw = latents.encode(images_BCHW).float().cpu()
        expect = (len(group), latents.channels, bh // latents.downsample, bw // latents.downsample)
        if tuple(lat_BChw.shape) != expect:
            raise ValueError(f"latents.encode gave {tuple(lat_BChw.shape)} for bucket {bh}x{bw}, expected {expect}")
        feats_BTKD, mask_BT = encoder.encode([caption for _, caption, _ in loaded])
        repa_BND = grid = None
        if vision is not None:
            repa_BND = vision.encode(images_BCHW).float().cpu()
            grid = [int(g) for g in vision.grid(bh, bw)]
            repa_meta.update(model=getattr(vision, "name", type(vision).__name__), dim=int(repa_BND.shape[-1]),
                             grid="per sample")
        for i, ((_, pos), (_, caption, info)) in enumerate(zip(group, loaded)):
            item = chunk.items[pos]
            arrays = {"latent": lat_BChw[i].numpy().astype(np.float16),
                      "text": valid_text(feats_BTKD[i], mask_BT[i], suffix, f"{item.key} ({caption!r})")}
            if repa_BND is not None:
                arrays["repa"] = repa_BND[i].numpy().astype(np.float16)
            overflow = [k for k, a in arrays.items() if not np.isfinite(a).all()]
            if overflow:
                rejects.append({"source": item.key, "position": pos,
                                "reason": f"{overflow} features not finite in float16"})
                continue
            record = {"caption": caption, "source": item.key, "bucket": [bh, bw], **info}
            if grid is not None:
                record["repa_grid"] = grid
            # Keys are chunk id + input position: a rewrite of the chunk reuses them.
            yield f"c{chunk.index:06d}-{pos:06d}", record, arrays, bucket


@torch.no_grad()
def write_chunk(chunk: Chunk, out_dir: str, latents, encoder, cfg: WriterConfig | None = None,
                vision=None) -> dict:
    """Encode and write one chunk; returns its done marker. A chunk already done is not redone.

    `latents`: encode(images_BCHW in [-1, 1]) -> latents_BCHW, .channels, .downsample.
    `encoder`: data.text.TextEncoder (encode(prompts) -> (feats_BTKD, mask_BT), layers, dim, max_len).
    `vision` (optional iREPA targets): encode(images_BCHW in [-1, 1]) -> (B, N, Dv), grid(h, w) -> (gh, gw).
    """
    cfg = cfg or WriterConfig()
    done = _done_marker(out_dir, chunk.name)
    if done is not None:
        return done
    os.makedirs(out_dir, exist_ok=True)
    if not os.path.exists(os.path.join(out_dir, "empty_text.npy")):
        feats_1TKD, mask_1T = encoder.encode([""])
        write_empty_text(out_dir, valid_text(feats_1TKD[0], mask_1T[0], text_suffix(encoder), "the empty prompt"))
    t0 = time.perf_counter()
    chunk = fetch_chunk(chunk)  # members of streamed tars, read once (both passes below read each input)
    rejects, repa_meta = [], {}
    # One shard per chunk (the chunk size sets the shard size); the list form leaves room for more.
    shard = write_tar(os.path.join(out_dir, f"{chunk.name}-0000.tar"),
                      _encode_chunk(chunk, latents, encoder, vision, cfg, rejects, repa_meta))
    rejects.sort(key=lambda r: r["position"])
    meta = {**encoder_meta(latents, encoder, cfg), "repa": repa_meta or None}
    return write_done(out_dir, chunk.name, [shard], rejects, meta, len(chunk.items), time.perf_counter() - t0)


# ---- the index -------------------------------------------------------------------------------
def build_index(out_dir: str) -> dict:
    """Assemble index.json from the done markers (atomically); ValueError if chunks disagree."""
    done_dir = os.path.join(out_dir, "done")
    names = sorted(n for n in os.listdir(done_dir) if n.endswith(".json")) if os.path.isdir(done_dir) else []
    if not names:
        raise ValueError(f"{out_dir}: no finished chunks (done/*.json); write chunks before building the index")
    meta, repa, shards = None, None, []
    for name in names:
        with open(os.path.join(done_dir, name)) as f:
            marker = json.load(f)
        this = {k: v for k, v in marker["meta"].items() if k != "repa"}
        if meta is None:
            meta, first = this, name
        elif this != meta:
            raise ValueError(f"{out_dir}: done/{name} was encoded with {this}, but done/{first} with {meta}; "
                             f"one shard set needs one encoder/latent/bucket configuration")
        if marker["accepted"]:  # an empty chunk cannot say whether repa features were computed
            if repa is None:
                repa, repa_from = marker["meta"]["repa"] or {}, name
            elif (marker["meta"]["repa"] or {}) != repa:
                raise ValueError(f"{out_dir}: done/{name} has repa={marker['meta']['repa']} but "
                                 f"done/{repa_from} has {repa or None}")
        for shard in marker["shards"]:
            path = os.path.join(out_dir, shard["name"])
            if not os.path.exists(path) or os.path.getsize(path) != shard["bytes"]:
                raise ValueError(f"{out_dir}: done/{name} lists {shard['name']} of {shard['bytes']} bytes, "
                                 f"which is missing or of another size; delete the marker to rewrite the chunk")
            shards.append(shard)
    if not os.path.exists(os.path.join(out_dir, "empty_text.npy")):
        raise ValueError(f"{out_dir}: empty_text.npy is missing (write_chunk writes it)")
    index = {**meta, "repa": repa or None, "empty_text": "empty_text.npy", "chunks": len(names),
             "max_text": max(s["max_text"] for s in shards), "shards": shards,
             "total": sum(s["samples"] for s in shards)}
    _atomic_write(os.path.join(out_dir, "index.json"), json.dumps(index).encode())
    return index


def write_shards(inputs: str | list[Chunk], out_dir: str, latents, encoder, cfg: WriterConfig | None = None,
                 vision=None, chunk_size: int = 1000, progress=print) -> dict:
    """list_chunks -> write_chunk for each (done ones are skipped) -> build_index; returns the index."""
    chunks = list_chunks(inputs, chunk_size) if isinstance(inputs, str) else inputs
    t0, samples, rejects, fresh = time.perf_counter(), 0, 0, 0
    for n, chunk in enumerate(chunks, 1):
        already = _done_marker(out_dir, chunk.name) is not None
        marker = write_chunk(chunk, out_dir, latents, encoder, cfg, vision)
        samples, rejects = samples + marker["accepted"], rejects + marker["rejects"]
        fresh += 0 if already else marker["accepted"]  # the rate counts this run's work only
        if progress:
            rate = fresh / max(time.perf_counter() - t0, 1e-9)
            progress(f"chunks {n}/{len(chunks)} | {samples} samples | {rate:.1f} samples/s | {rejects} rejects")
    return build_index(out_dir)


def default_text_layers(encoder_path: str) -> list[int]:
    """The hidden states to tap when none are given: Krea 2's 2, 5, ..., 35 for an encoder
    that deep (Qwen3-VL-4B has 36 layers), else every decoder layer (the tiny demo encoder,
    a base run's `text_encoder/` folder included: 1 2 3 4)."""
    path = os.path.join(encoder_path, "config.json")
    config = {}
    if os.path.exists(path):
        with open(path) as f:
            config = json.load(f)
    depth = config.get("text_config", config).get("num_hidden_layers", 36)
    return list(range(2, 36, 3)) if depth >= 36 else list(range(1, depth + 1))


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description="Encode captioned images into k2train shards (docs/SHARDS.md).")
    parser.add_argument("--input", required=True,
                        help="folder, .tar path(s) or URL(s) (pipe:CMD, https://...; braces expand), or "
                             "shapes:N[:SIZE[:SEED]] (also shapes-pink:..., shapes-pink-val:...)")
    parser.add_argument("--output", required=True, help="shard directory (created; a rerun resumes)")
    parser.add_argument("--chunk-size", type=int, default=1000, help="inputs per chunk (= per shard)")
    parser.add_argument("--resolution", type=int, default=256, help="bucket area is resolution² pixels")
    parser.add_argument("--bucket-multiple", type=int, default=64, help="bucket sides are multiples of this")
    parser.add_argument("--min-side", type=int, default=32)
    parser.add_argument("--max-side", type=int, default=16384)
    parser.add_argument("--max-aspect", type=float, default=4.0)
    parser.add_argument("--micro-batch", type=int, default=8)
    parser.add_argument("--encoder", default=None,
                        help="Qwen3-VL folder, or a base run's shards/text_encoder; default: build the tiny demo "
                             "encoder into OUTPUT/text_encoder")
    parser.add_argument("--latents", default="pixels", choices=["pixels", "shapes_ae", "qwen_image", "flux2"])
    parser.add_argument("--vae-path", default=None)
    parser.add_argument("--pixel-downsample", type=int, default=1, help="--latents pixels: average-pool factor")
    parser.add_argument("--text-len", type=int, default=512)
    parser.add_argument("--text-layers", type=int, nargs="+", default=None,
                        help="hidden states to tap (default: every layer of a shallow encoder, 1 2 3 4 for the "
                             "tiny one; 2 5 ... 35 for a 36-layer one)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)

    from data.latents import make_latents
    from data.shapes import ShapesWorld
    from data.shapes_loader import ensure_tiny_encoder
    from data.text import TextEncoder

    encoder_path = args.encoder
    if encoder_path is None:  # the same deterministic artifact the shapes demo builds
        encoder_path = ensure_tiny_encoder(os.path.join(args.output, "text_encoder"), ShapesWorld().all_captions())
    layers = args.text_layers or default_text_layers(encoder_path)
    encoder = TextEncoder.from_pretrained(encoder_path, layers=layers, max_len=args.text_len, device=args.device)
    latents = make_latents(args.latents, args.vae_path, device=args.device, pixel_downsample=args.pixel_downsample)
    cfg = WriterConfig(resolution=args.resolution, bucket_multiple=args.bucket_multiple, min_side=args.min_side,
                       max_side=args.max_side, max_aspect=args.max_aspect, micro_batch=args.micro_batch)
    t0 = time.perf_counter()
    index = write_shards(args.input, args.output, latents, encoder, cfg, chunk_size=args.chunk_size)
    reasons = Counter()
    for name in sorted(os.listdir(os.path.join(args.output, "rejects"))):
        with open(os.path.join(args.output, "rejects", name)) as f:
            reasons.update(json.loads(line)["reason"].split(":")[0] for line in f)
    per_bucket = Counter()
    for shard in index["shards"]:
        per_bucket.update(shard["buckets"])
    print(f"wrote {index['total']} samples in {len(index['shards'])} shards to {args.output} "
          f"in {time.perf_counter() - t0:.1f}s; buckets {dict(sorted(per_bucket.items()))}; "
          f"rejects {sum(reasons.values())} {dict(reasons)}")
    return index


if __name__ == "__main__":
    main()
