"""Shard writing as Krablet jobs: one `shards.write_chunk` job per input chunk,
then one `shards.index` job that depends on all of them.

    python -m krablet.pipeline --input /data/images --output /shards/256 --workers 8 [--dsn ...]

Inputs are data/shard_inputs.py's: a folder, a .tar, or a shapes stream. For the shapes
world without --encoder, the tiny demo encoder is built into OUTPUT/text_encoder. A
fine-tuning set must be encoded with its base run's encoder, so its text features are
the ones the base model learned:

    python -m krablet.pipeline --input shapes-pink:2400:32 --output runs/demo/pink \
        --encoder runs/demo/shards/text_encoder ...

With `--latents shapes_ae --vae-path DIR` the latents are the shapes world's own
autoencoder (data/autoencoder.py). If DIR holds none yet, a `shards.train_autoencoder`
job trains it first (settings: `--ae key=value ...`, AEConfig's fields) and every chunk
job depends on it, so the demo's first step trains and caches the autoencoder too:

    python -m krablet.pipeline --input shapes:4800:32 --output runs/demo/shards --resolution 32 \
        --bucket-multiple 16 --latents shapes_ae --vae-path runs/demo/autoencoder

Job keys are (output folder, chunk name, digest of the chunk's inputs and settings),
so submitting the same ingestion twice adds nothing while another ingestion into the
same folder is new work, and a chunk job re-run after a worker died rewrites the
same shard names (`data.writer.write_chunk` publishes a chunk atomically and
skips a finished one): no sample is lost or written twice.
"""

import argparse
import hashlib
import json
import os
import threading
import time
from dataclasses import asdict

from data.shard_inputs import Chunk, list_chunks
from data.writer import WriterConfig, build_index, default_text_layers, latents_kind, write_chunk
from krablet.kinds import kind, require
from krablet.queue import NewJob, ShardQueue, connect

# Loading a text encoder (4B parameters in production) per job would dominate
# the job, so each worker process keeps the ones it has built. Only what loaded is
# kept: a worker that met an autoencoder folder before its training job finished
# raised then, and loads it afresh once it is there.
_TEXT_ENCODERS: dict[tuple, object] = {}
_LATENTS: dict[tuple, object] = {}


def _encoders(p: dict):
    from data.latents import make_latents
    from data.text import TextEncoder

    device = p.get("device", "cpu")
    text_key = (p["encoder"], tuple(p["text_layers"]), p["text_len"], device)
    # vae_settings (shapes_ae): a folder retrained with other settings is another latent space.
    latents_key = (p["latents"], p.get("vae_path"), p.get("pixel_downsample", 1), device,
                   json.dumps(p.get("vae_settings"), sort_keys=True))
    if latents_key not in _LATENTS:
        _LATENTS[latents_key] = make_latents(p["latents"], p.get("vae_path"), device=device,
                                             pixel_downsample=p.get("pixel_downsample", 1))
    if text_key not in _TEXT_ENCODERS:
        _TEXT_ENCODERS[text_key] = TextEncoder.from_pretrained(p["encoder"], layers=p["text_layers"],
                                                               max_len=p["text_len"], device=device)
    return _LATENTS[latents_key], _TEXT_ENCODERS[text_key]


def _validate_chunk(p: dict) -> None:
    require(p, chunk=dict, out=str, encoder=str, latents=str, text_len=int, text_layers=list, writer=dict)
    Chunk.from_json(p["chunk"])  # raises on a malformed chunk
    WriterConfig(**p["writer"])


class _StopsWhenLeaseLost:
    """A latents or text encoder whose ``encode`` first checks the job's lease: a chunk job
    whose lease was lost stops at its next bucket instead of encoding the rest for nothing
    (``write_chunk`` publishes a chunk only once all of it is written, so nothing half-done
    is left behind)."""

    def __init__(self, inner, ctx):
        self._inner, self._ctx = inner, ctx
        self.kind = latents_kind(inner)  # read by the writer's metadata (the type name would be this class's)

    def encode(self, *args, **kwargs):
        self._ctx.check()
        return self._inner.encode(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._inner, name)


@kind("shards.write_chunk", validate=_validate_chunk)
def write_chunk_job(payload: dict, ctx) -> dict:
    latents, encoder = _encoders(payload)
    ctx.check()
    marker = write_chunk(Chunk.from_json(payload["chunk"]), payload["out"], _StopsWhenLeaseLost(latents, ctx),
                         _StopsWhenLeaseLost(encoder, ctx), WriterConfig(**payload["writer"]))
    return {"accepted": marker["accepted"], "rejects": marker["rejects"]}


def _validate_autoencoder(p: dict) -> None:
    from data.autoencoder import AEConfig

    require(p, out=str, settings=dict)
    AEConfig.from_dict(p["settings"])  # raises on unknown or invalid settings


@kind("shards.train_autoencoder", validate=_validate_autoencoder)
def train_autoencoder_job(payload: dict, ctx) -> dict:
    """Train the shapes autoencoder into payload["out"] (a no-op if a worker already did)."""
    import torch

    from data.autoencoder import AEConfig, ensure_autoencoder

    # Every other job of the ingestion waits for this one, so it may use the cores the
    # pool split between its workers (small convolutions gain nothing past a few).
    threads = torch.get_num_threads()
    torch.set_num_threads(max(threads, min(4, os.cpu_count() or 1)))
    try:
        def progress(line):
            print(f"[autoencoder] {line}", flush=True)
            if ctx is not None:  # run as a job (not called directly): stop once the lease is lost
                ctx.check()

        config = ensure_autoencoder(payload["out"], AEConfig.from_dict(payload["settings"]), log_every=500,
                                    progress=progress)
    finally:
        torch.set_num_threads(threads)
    report = config["reconstruction"]
    return {"out": payload["out"], "seconds": config["training"]["seconds"], "mae": report["mae"],
            "agreement": report["agreement"]}


@kind("shards.index", validate=lambda p: require(p, out=str))
def index_job(payload: dict, ctx) -> dict:
    index = build_index(payload["out"])
    return {"total": index["total"], "shards": len(index["shards"])}


def ingest_jobs(inputs: str | list[Chunk], out: str, encoder: str, chunk_size: int = 1000, text_len: int = 512,
                text_layers: list[int] | None = None, latents: str = "pixels", vae_path: str | None = None,
                pixel_downsample: int = 1, writer: WriterConfig | None = None, device: str = "cpu",
                autoencoder=None) -> list[NewJob]:
    """The jobs that write `inputs` into shards at `out`: the chunk jobs, then the index job.

    latents="shapes_ae": if `vae_path` holds no trained autoencoder, a train job first
    (settings `autoencoder`, a data.autoencoder.AEConfig; default: AEConfig at the writer's
    resolution) that the chunk jobs depend on. A folder that holds one is used as it is.
    """
    out = os.path.abspath(out)
    writer = writer or WriterConfig()
    pre: list[NewJob] = []
    vae_settings = None
    if latents == "shapes_ae":
        from data.autoencoder import AEConfig, read_config

        if not vae_path:
            raise ValueError("latents='shapes_ae' needs vae_path: the autoencoder folder (trained there if absent)")
        vae_path = os.path.abspath(vae_path)
        trained = read_config(vae_path)
        if trained is not None:
            vae_settings = trained["settings"]
        else:
            vae_settings = asdict(autoencoder or AEConfig(resolution=writer.resolution))
            pre.append(NewJob("shards.train_autoencoder", {"out": vae_path, "settings": vae_settings},
                              key=f"autoencoder:{vae_path}:{_digest(vae_settings)}"))
    common = {"out": out, "encoder": os.path.abspath(encoder), "text_len": text_len,
              "text_layers": list(text_layers or [1, 2, 3, 4]), "latents": latents, "vae_path": vae_path,
              "pixel_downsample": pixel_downsample, "writer": asdict(writer), "device": device}
    if vae_settings is not None:  # the same keys whether this run trains the autoencoder or finds it
        common["vae_settings"] = vae_settings
    deps = tuple(j.key for j in pre)
    chunks = [NewJob("shards.write_chunk", payload := {**common, "chunk": c.to_json()},
                     key=f"shards:{out}:{c.name}:{_digest(payload)}", deps=deps)
              for c in (list_chunks(inputs, chunk_size) if isinstance(inputs, str) else inputs)]
    index = NewJob("shards.index", {"out": out}, key=f"shards:{out}:index:{_digest([j.key for j in chunks])}",
                   deps=tuple(j.key for j in chunks))
    return pre + chunks + [index]


def _digest(value) -> str:
    """A short digest of what a job does: the same folder written from other inputs or
    settings is other work, not a job that is already done."""
    return hashlib.blake2b(json.dumps(value, sort_keys=True).encode(), digest_size=6).hexdigest()


class _Progress:
    """Prints the shard jobs' progress every few seconds while the workers run.

    "done" counts this ingestion's jobs (by key), not the earlier ingestions that
    share the database (a fine-tuning set written beside its base set)."""

    def __init__(self, dsns: list[str], keys: list[str], every_s: float = 5.0):
        self.dsns, self.keys, self.total, self.every_s = dsns, keys, len(keys), every_s
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._loop, daemon=True)

    def __enter__(self):
        self.start = time.monotonic()
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()
        self._print()

    def _loop(self) -> None:
        while not self.stop.wait(self.every_s):
            self._print()

    def _print(self) -> None:
        states: dict[str, int] = {"done": 0}
        for dsn in self.dsns:
            try:
                with connect(dsn) as conn:
                    queue = ShardQueue(conn)
                    for (state, kind_name), n in queue.counts().items():
                        if kind_name.startswith("shards.") and state != "done":
                            states[state] = states.get(state, 0) + n
                    states["done"] += len(queue.done_keys(self.keys))
            except Exception as e:  # progress is best effort; the workers report their own errors
                print(f"progress: shard unreachable ({type(e).__name__})", flush=True)
                return
        rest = " ".join(f"{s}={n}" for s, n in sorted(states.items()) if s != "done")
        print(f"[{time.monotonic() - self.start:6.1f}s] jobs done {states.get('done', 0)}/{self.total} {rest}",
              flush=True)


def main(argv: list[str] | None = None) -> int:
    from data.shapes import ShapesWorld
    from data.shapes_loader import ensure_tiny_encoder
    from krablet.cli import configured_dsns, shard_dsns
    from krablet.schema import migrate
    from krablet.shards import ShardSet
    from krablet.worker import WorkerConfig, run_pool

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", required=True,
                   help="folder, .tar, or shapes:N[:SIZE[:SEED]] (also shapes-pink:..., shapes-pink-val:...)")
    p.add_argument("--output", required=True, help="shard directory")
    p.add_argument("--chunk-size", type=int, default=1000)
    p.add_argument("--resolution", type=int, default=256, help="bucket area is resolution² pixels")
    p.add_argument("--bucket-multiple", type=int, default=64, help="bucket sides are multiples of this")
    p.add_argument("--encoder", default=None,
                   help="Qwen3-VL folder, or a base run's shards/text_encoder; default: build the tiny demo "
                        "encoder into OUTPUT/text_encoder")
    p.add_argument("--text-len", type=int, default=512)
    p.add_argument("--text-layers", type=int, nargs="+", default=None,
                   help="hidden states to tap (default: every layer of a shallow encoder, 1 2 3 4 for the "
                        "tiny one; 2 5 ... 35 for a 36-layer one)")
    p.add_argument("--latents", default="pixels", choices=["pixels", "qwen_image", "flux2", "shapes_ae"])
    p.add_argument("--vae-path", default=None,
                   help="VAE folder; for shapes_ae the autoencoder folder, trained by a job first if absent")
    p.add_argument("--ae", nargs="+", default=[], metavar="KEY=VALUE",
                   help="--latents shapes_ae: settings of an autoencoder still to train (data/autoencoder.py "
                        "AEConfig, e.g. downsample=8 channels=8 steps=3000); resolution defaults to --resolution")
    p.add_argument("--pixel-downsample", type=int, default=1)
    p.add_argument("--workers", type=int, default=2, help="worker processes here (more can join from elsewhere)")
    p.add_argument("--dsn", action="append", help="shard DSN (repeat); default $KRABLET_DSNS, else embedded")
    p.add_argument("--run-dir", default="runs/krablet", help="embedded PostgreSQL lives here")
    p.add_argument("--shards", type=int, default=1, help="embedded shard count")
    args = p.parse_args(argv)

    encoder = args.encoder or ensure_tiny_encoder(os.path.join(args.output, "text_encoder"),
                                                  ShapesWorld().all_captions())
    layers = args.text_layers or default_text_layers(encoder)
    writer = WriterConfig(resolution=args.resolution, bucket_multiple=args.bucket_multiple)
    autoencoder = None
    if args.latents == "shapes_ae":
        from data.autoencoder import settings_from_args

        autoencoder = settings_from_args(args.ae, resolution=args.resolution)
    elif args.ae:
        p.error("--ae applies to --latents shapes_ae only")
    jobs = ingest_jobs(args.input, args.output, encoder, args.chunk_size, args.text_len, layers, args.latents,
                       args.vae_path, args.pixel_downsample, writer, autoencoder=autoencoder)
    try:
        configured_dsns(args)  # a password in --dsn, an unreadable DSN file: refused before any work
    except (ValueError, OSError) as e:
        p.error(str(e))
    with shard_dsns(args) as dsns:
        for dsn in dsns:
            migrate(dsn)
        shards = ShardSet(dsns)
        try:
            shards.submit(jobs)
        finally:
            shards.close()
        trains = sum(j.kind == "shards.train_autoencoder" for j in jobs)
        print(f"submitted {'1 autoencoder job + ' if trains else ''}{len(jobs) - 1 - trains} chunk jobs + 1 index job; "
              f"running {args.workers} workers until drained", flush=True)
        # A chunk job runs for seconds to minutes: claim one at a time so every worker gets work.
        # Encoders are multi-threaded: share the cores between the worker processes.
        os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // max(1, args.workers))))
        config = WorkerConfig(dsns, batch_size=1, drain=True, kind_modules=["krablet.pipeline"])
        with _Progress(dsns, [j.key for j in jobs]):
            rc = run_pool(config, args.workers)
    index_path = os.path.join(args.output, "index.json")
    if rc == 0 and os.path.exists(index_path):
        import json

        with open(index_path) as f:
            index = json.load(f)
        print(f"{args.output}: {index['total']} samples in {len(index['shards'])} shards")
    return rc


if __name__ == "__main__":
    raise SystemExit(main())
