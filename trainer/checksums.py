"""Checksums of a checkpoint's files: recorded when it is published, verified before it is loaded.

A checkpoint folder's `checksums.json` lists every other file in it with its size and
the SHA-256 of each block of `BLOCK_BYTES`:

    {"algorithm": "sha256", "block_bytes": 67108864,
     "files": {"__0_0.distcp": {"bytes": 1234, "blocks": ["9f86…", …]}, …}}

Blocks rather than whole files, because DCP writes one large file per rank (34 GB for
`2b` with AdamW and EMA on one GPU): a file hashes at ~1.5 GB/s on one core, its blocks
in parallel on all of them. The blocks are dealt round-robin to the ranks, and each rank
hashes its share with a thread pool (hashlib releases the GIL), so writing and verifying
both scale with the job. A missing, resized, truncated or rewritten file fails
verification, and so does a file the list does not know (something was put there).
"""

import hashlib
import json
import os
from concurrent.futures import ThreadPoolExecutor

MANIFEST = "checksums.json"
BLOCK_BYTES = 64 << 20
ALGORITHM = "sha256"


class ChecksumError(ValueError):
    """A checkpoint's files do not match its checksums (or it has none that parse)."""


def _jobs(sizes: dict[str, int], block: int) -> list[tuple[str, int]]:
    """(file, block number) for every block of every file, in a fixed order."""
    return [(name, b) for name in sorted(sizes) for b in range(max(1, -(-sizes[name] // block)))]


def _hash_block(folder: str, name: str, b: int, block: int) -> str:
    h = hashlib.sha256()
    with open(os.path.join(folder, name), "rb") as f:
        f.seek(b * block)
        left = block
        while left:
            chunk = f.read(min(left, 8 << 20))
            if not chunk:
                break
            h.update(chunk)
            left -= len(chunk)
    return h.hexdigest()


def _hash_share(folder: str, jobs: list[tuple[str, int]], block: int, rank: int, world_size: int,
                threads: int) -> dict[tuple[str, int], str]:
    mine = jobs[rank::world_size]
    with ThreadPoolExecutor(max(1, threads)) as pool:
        digests = list(pool.map(lambda job: _hash_block(folder, job[0], job[1], block), mine))
    return dict(zip(mine, digests))


def _gather(parts: dict, d) -> dict:
    """Every rank's digests on every rank (`d`: trainer.parallel.Dist, None for one process)."""
    if d is None or d.world_size == 1:
        return parts
    return {k: v for part in d.all_objects(parts) for k, v in part.items()}


def default_threads(world_size: int = 1) -> int:
    """This process's share of the host's cores (ranks on one host hash at the same time)."""
    local = int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
    return max(1, (os.cpu_count() or 1) // max(1, local))


def record(folder: str, d=None, threads: int | None = None) -> dict:
    """Hashes every file in `folder` (all ranks call this together) and, on rank 0, writes
    and fsyncs checksums.json. Returns the manifest."""
    sizes = {n: os.path.getsize(os.path.join(folder, n)) for n in os.listdir(folder)
             if n != MANIFEST and os.path.isfile(os.path.join(folder, n))}
    rank, world_size = (d.rank, d.world_size) if d is not None else (0, 1)
    jobs = _jobs(sizes, BLOCK_BYTES)
    digests = _gather(_hash_share(folder, jobs, BLOCK_BYTES, rank, world_size,
                                  threads or default_threads(world_size)), d)
    manifest = {"algorithm": ALGORITHM, "block_bytes": BLOCK_BYTES,
                "files": {n: {"bytes": sizes[n], "blocks": [digests[(m, b)] for m, b in jobs if m == n]}
                          for n in sorted(sizes)}}
    if rank == 0:
        write_synced(os.path.join(folder, MANIFEST), json.dumps(manifest, indent=0).encode())
    return manifest


def read_manifest(folder: str) -> dict | None:
    """The folder's checksums; None when it has none (written before checksums existed)."""
    path = os.path.join(folder, MANIFEST)
    if not os.path.exists(path):
        return None
    try:
        with open(path, "rb") as f:
            manifest = json.loads(f.read())
        files, block = manifest["files"], int(manifest["block_bytes"])
        if manifest["algorithm"] != ALGORITHM or block <= 0:
            raise ValueError(f"algorithm {manifest['algorithm']!r}, block {block}")
        for name, entry in files.items():
            int(entry["bytes"]), list(entry["blocks"])
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise ChecksumError(f"{path}: unreadable ({type(e).__name__}: {e})") from None
    return manifest


def verify(folder: str, d=None, threads: int | None = None) -> list[str]:
    """Problems found in `folder` against its checksums.json, one line per file (empty: all
    good). All ranks call this together and get the same list. Raises ChecksumError if
    checksums.json is unreadable; a folder without one gives [] (nothing to check)."""
    manifest = read_manifest(folder)
    if manifest is None:
        return []
    files, block = manifest["files"], int(manifest["block_bytes"])
    problems, sizes = [], {}
    for name, entry in files.items():
        path = os.path.join(folder, name)
        if not os.path.isfile(path):
            problems.append(f"{name}: missing")
        elif os.path.getsize(path) != entry["bytes"]:
            problems.append(f"{name}: {os.path.getsize(path)} bytes, {entry['bytes']} recorded (truncated or rewritten)")
        else:
            sizes[name] = entry["bytes"]
    known = set(files) | {MANIFEST}
    problems += [f"{n}: not in {MANIFEST}" for n in sorted(os.listdir(folder)) if n not in known]
    rank, world_size = (d.rank, d.world_size) if d is not None else (0, 1)
    jobs = _jobs(sizes, block)
    digests = _gather(_hash_share(folder, jobs, block, rank, world_size, threads or default_threads(world_size)), d)
    bad = {}
    for name, b in jobs:
        if digests[(name, b)] != files[name]["blocks"][b]:
            bad.setdefault(name, []).append(b)
    for name, blocks in sorted(bad.items()):
        at = ", ".join(f"{b * block}-{min((b + 1) * block, sizes[name])}" for b in blocks[:3])
        problems.append(f"{name}: {ALGORITHM} mismatch in bytes {at}{' …' if len(blocks) > 3 else ''} "
                        f"(damaged in place)")
    return problems


def write_synced(path: str, data: bytes) -> None:
    """Writes `data` to `path` through a temporary file that is fsynced before the rename,
    so a power loss leaves the old file or the new one, never an empty one."""
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
