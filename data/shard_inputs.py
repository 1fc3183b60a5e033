"""What the shard writer reads: inputs listed into chunks, each input read and validated.

Inputs (`list_chunks(spec, chunk_size)`):
  - a folder, walked in sorted order: images (.jpg/.jpeg/.png/.webp) with a caption from
    a sidecar `<name>.txt`, or `<name>.json` {"caption": ...}, or a `captions.jsonl` in
    the same folder with lines {"file": "<name>.jpg", "caption": ...}; `.tar` files in
    the folder are read as below;
  - webdataset tars (uncompressed), groups `<key>.jpg|png|webp` + `<key>.txt|json`, opened
    with webdataset's gopen: a local `.tar` path, or a URL it opens as a stream, such as
    `pipe:cat /data/x.tar` or `pipe:aws s3 cp s3://bucket/x.tar -` (a command whose
    stdout is the tar), `https://...`; braces and `::` lists expand as in webdataset
    (`pipe:aws s3 cp s3://bucket/part-{000..099}.tar -`). An input's key is
    `<tar name>/<key>`, the tar name being the file name the path or URL ends in
    (`x.tar` for both examples above), so a tar read locally or by URL gives the same keys;
  - `shapes:N[:SIZE[:SEED]]`: samples 0..N-1 of the demo shapes world's pretraining
    stream (data/shapes.py: ShapesWorld);
  - `shapes-pink:N[:SIZE[:SEED]]`: the fine-tuning stream of the colour pretraining never
    draws (ConceptWorld, split "train"); `shapes-pink-val:N[:SIZE[:SEED]]`: its validation
    split, other images of the same caption distribution; `shapes-pink-mix:N[:SIZE[:SEED]]`:
    the training stream with half its samples replayed from the pretraining distribution
    (fine-tuning that does not forget). SIZE defaults to 32, SEED to 0.

Listing only reads names and tar headers (a local tar is read by seeking from header to
header; a stream has to be read through once); `load_item` reads and decodes one input
and raises `Reject(reason)` for anything unusable (the writer records the reason and
moves on). A streamed tar cannot seek, so the writer calls `fetch_chunk` first: each
tar a chunk draws from is streamed once and the chunk's members held in memory.
"""

from __future__ import annotations

import io
import json
import logging
import os
import tarfile
from dataclasses import asdict, dataclass, field, replace
from urllib.parse import urlparse

import webdataset as wds
from PIL import Image, ImageOps
from webdataset.shardlists import expand_urls
from webdataset.tariterators import tar_file_iterator

from data.shapes import ConceptWorld, ShapesWorld

log = logging.getLogger(__name__)

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
CAPTION_EXTS = ("txt", "json")


# ---- inputs ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Item:
    """One input, described by where to read it (JSON-able, so a chunk can travel in a job row).

    image:   ["file", path] | ["tar", path, offset, size] | ["url", url, member] | ["shapes", image_size, seed,
             index] | ["shapes", image_size, seed, index, stream] (stream: a SHAPES_STREAMS name but "shapes")
    caption: ["text", str] | ["file", path] | ["tar", path, offset, size, ext] | ["url", url, member, ext]
             | None (missing)
    ("url": a member of a streamed tar; fetch_chunk replaces it with ["bytes", data], in memory only.)
    """

    key: str  # stable name of the input, reported in rejects and stored as `source`
    image: tuple
    caption: tuple | None = None
    meta: dict = field(default_factory=dict, compare=False)  # extra caption-file fields


@dataclass(frozen=True)
class Chunk:
    index: int
    items: tuple[Item, ...]

    @property
    def name(self) -> str:
        return f"chunk-{self.index:06d}"

    def to_json(self) -> dict:
        return {"index": self.index, "items": [asdict(it) for it in self.items]}

    @classmethod
    def from_json(cls, d: dict) -> "Chunk":
        items = tuple(Item(it["key"], tuple(it["image"]), tuple(it["caption"]) if it["caption"] else None,
                           it.get("meta", {})) for it in d["items"])
        return cls(int(d["index"]), items)


def _split_ext(name: str) -> tuple[str, str]:
    """webdataset convention: the key ends at the first dot of the base name; the type is the last suffix."""
    folder, base = os.path.split(name)
    stem, _, ext = base.partition(".")
    return os.path.join(folder, stem), ext.rsplit(".", 1)[-1].lower()


def _slot(name: str) -> tuple[str, str | None, str]:
    """(key, "image" | "caption" | None, ext) of a tar member's name."""
    key, ext = _split_ext(name)
    return key, "image" if ext in IMAGE_EXTS else "caption" if ext in CAPTION_EXTS else None, ext


def _list_tar(path: str, key_prefix: str) -> list[Item]:
    """A local tar, read by seeking from header to header: its members are referenced by byte offset."""
    groups: dict[str, dict] = {}
    try:
        with wds.gopen(path, "rb") as f, tarfile.open(fileobj=f, mode="r:") as tar:
            try:
                for m in tar:
                    key, slot, ext = _slot(m.name)
                    if m.isfile() and slot:
                        ref = ("tar", path, m.offset_data, m.size) + ((ext,) if slot == "caption" else ())
                        groups.setdefault(key, {}).setdefault(slot, ref)
            except tarfile.ReadError as e:
                # The members listed so far stay; one whose data runs past the end is
                # rejected when read. What came after the cut cannot be known.
                log.warning("%s is truncated after %d groups (%s); later members are lost", path, len(groups), e)
    except tarfile.ReadError as e:
        raise ValueError(f"{path}: not a readable uncompressed tar ({e}); compressed tars are not supported, "
                         f"since samples are read by byte offset") from e
    return [Item(f"{key_prefix}/{key}", g["image"], g.get("caption")) for key, g in groups.items() if "image" in g]


def _list_stream(url: str, key_prefix: str) -> list[Item]:
    """A tar streamed from `url` through webdataset's gopen (a pipe: command, https://, ...),
    read through once: its members are referenced by name."""
    groups: dict[str, dict] = {}
    try:
        with wds.gopen(url, "rb") as stream:
            try:
                with tarfile.open(fileobj=stream, mode="r|*") as tar:  # a stream may be compressed
                    for m in tar:
                        key, slot, ext = _slot(m.name)
                        if m.isfile() and slot:
                            ref = ("url", url, m.name) + ((ext,) if slot == "caption" else ())
                            groups.setdefault(key, {}).setdefault(slot, ref)
            except tarfile.ReadError as e:
                if not groups:
                    raise
                log.warning("%s is truncated after %d groups (%s); later members are lost", url, len(groups), e)
    except (OSError, ValueError, tarfile.TarError) as e:
        raise ValueError(f"input {url!r}: cannot be read as a tar stream ({type(e).__name__}: {e})") from e
    return [Item(f"{key_prefix}/{key}", g["image"], g.get("caption")) for key, g in groups.items() if "image" in g]


def _is_url(spec: str) -> bool:
    """Something webdataset's gopen opens as a stream rather than a local path (a one-letter
    scheme would be a Windows drive)."""
    return spec.startswith("pipe:") or len(urlparse(spec).scheme) > 1


def _tar_name(url: str) -> str:
    """The file name a tar's path or URL ends in: the last word of a pipe: command that names
    a .tar (`pipe:aws s3 cp s3://b/x.tar -` -> x.tar), else the URL's last path part."""
    words = [w for w in url.split() if ".tar" in w] or [url]
    return os.path.basename(urlparse(words[-1]).path.rstrip("/")) or url


def _list_tars(spec: str) -> list[Item] | None:
    """The items of the tars (paths or URLs) `spec` names, braces and `::` lists expanded;
    None when it names none."""
    urls = expand_urls(spec)
    if not all(_is_url(u) or (os.path.isfile(u) and u.endswith(".tar")) for u in urls):
        return None
    items, names = [], {}
    for url in urls:
        name = _tar_name(url)
        if name in names:
            raise ValueError(f"input {spec!r}: {names[name]!r} and {url!r} are both named {name!r}; input keys "
                             f"(<tar name>/<key>) would collide")
        names[name] = url
        local = url[len("file://"):] if url.startswith("file://") else url
        items += _list_stream(url, name) if _is_url(local) else _list_tar(local, name)
    return items


def _read_captions_jsonl(path: str) -> dict[str, tuple[str, dict]]:
    out = {}
    with open(path, encoding="utf-8") as f:
        for row, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                entry = json.loads(line)
                name = entry.get("file", entry.get("image"))
                caption = entry["caption"]
            except (json.JSONDecodeError, KeyError, AttributeError) as e:
                raise ValueError(f"{path} line {row}: expected a JSON object with 'file' and 'caption' ({e!r})") from e
            if not isinstance(name, str):
                raise ValueError(f"{path} line {row}: 'file' must be the image's file name, got {name!r}")
            out[name] = (caption, {k: v for k, v in entry.items() if k not in ("file", "image", "caption")})
    return out


def _list_folder(root: str) -> list[Item]:
    items = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        files = sorted(f for f in files if not f.startswith("."))
        jsonl = _read_captions_jsonl(os.path.join(folder, "captions.jsonl")) if "captions.jsonl" in files else {}
        present = set(files)
        for name in files:
            path = os.path.join(folder, name)
            rel = os.path.relpath(path, root)
            stem, ext = os.path.splitext(name)
            ext = ext[1:].lower()
            if ext == "tar":
                items.extend(_list_tar(path, rel))
            elif ext in IMAGE_EXTS:
                key = os.path.splitext(rel)[0]
                if stem + ".txt" in present:
                    items.append(Item(key, ("file", path), ("file", os.path.join(folder, stem + ".txt"))))
                elif stem + ".json" in present:
                    items.append(Item(key, ("file", path), ("file", os.path.join(folder, stem + ".json"))))
                elif name in jsonl:
                    caption, meta = jsonl[name]
                    items.append(Item(key, ("file", path), ("text", caption), meta))
                else:
                    items.append(Item(key, ("file", path), None))
    return items


# The procedural streams an input spec can name (`<stream>:N[:SIZE[:SEED]]`).
SHAPES_STREAMS = {
    "shapes": lambda size, seed: ShapesWorld(size, seed),
    "shapes-pink": lambda size, seed: ConceptWorld(size, seed, split="train"),
    "shapes-pink-val": lambda size, seed: ConceptWorld(size, seed, split="val"),
    "shapes-pink-mix": lambda size, seed: ConceptWorld(size, seed, split="train", replay=0.5),
}
_SPEC_HELP = ("a folder, a .tar file, a tar URL (pipe:CMD, https://...), or "
              + " | ".join(f"{s}:N[:SIZE[:SEED]]" for s in SHAPES_STREAMS))


def _list_shapes(stream: str, spec: str) -> list[Item]:
    parts = spec.split(":")[1:]
    try:
        if not 1 <= len(parts) <= 3:
            raise ValueError(f"{len(parts)} fields")
        n, size, seed = (int(p) for p in parts + ["32", "0"][len(parts) - 1:])
    except ValueError as e:
        raise ValueError(f"input {spec!r}: expected {stream}:N[:SIZE[:SEED]] with integers") from e
    try:
        SHAPES_STREAMS[stream](size, seed)  # an unusable size fails here, not in every job
    except ValueError as e:
        raise ValueError(f"input {spec!r}: {e}") from e
    # The pretraining stream keeps its 4-field reference (and key), as chunk jobs already store it.
    tail = () if stream == "shapes" else (stream,)
    return [Item(f"{stream}-{seed}-{size}/{i:08d}", ("shapes", size, seed, i) + tail) for i in range(n)]


def list_inputs(spec: str) -> list[Item]:
    """Every input of `spec` (a folder, tars by path or URL, or one of SHAPES_STREAMS) in a fixed order."""
    stream = spec.split(":", 1)[0]
    if stream in SHAPES_STREAMS and ":" in spec:
        return _list_shapes(stream, spec)
    if os.path.isdir(spec):
        return _list_folder(spec)
    items = _list_tars(spec)
    if items is None:
        raise ValueError(f"input {spec!r} is not {_SPEC_HELP}")
    return items


def list_chunks(spec: str, chunk_size: int) -> list[Chunk]:
    """The inputs of `spec` cut into chunks of `chunk_size` (the last may be shorter)."""
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    items = list_inputs(spec)
    return [Chunk(i, tuple(items[s:s + chunk_size])) for i, s in enumerate(range(0, len(items), chunk_size))]


# ---- reading and validating one input --------------------------------------------------------
class Reject(Exception):
    """An input the writer skips; the message is the reason recorded in rejects/<chunk>.jsonl."""


def _stream_members(url: str, names: set[str]) -> dict[str, bytes]:
    """{name: data} of the members `names` of the tar streamed from `url`, read through once
    (and stopped after the last one). A member missing from the result was not in the
    stream, or was cut off by its end. OSError if the stream itself fails (the job is
    then retried, not its inputs rejected)."""
    found: dict[str, bytes] = {}
    stream = wds.gopen(url, "rb")
    try:
        for member in tar_file_iterator(stream, skip_meta=None, select_files=names.__contains__):
            found[member["fname"]] = member["data"]
            if len(found) == len(names):
                break
    except tarfile.ReadError as e:
        log.warning("%s ends inside a member (%s): %d of %d members read", url, e, len(found), len(names))
    finally:
        try:
            stream.close()
        except OSError:
            # Stopped early, the command dies writing to a closed pipe: a failure only if
            # something is still missing.
            if len(found) < len(names):
                raise
    return found


def fetch_chunk(chunk: Chunk) -> Chunk:
    """`chunk` with the members of streamed tars (["url", ...] references) read into memory:
    each URL streamed once. Other references are left as they are."""
    wanted: dict[str, set[str]] = {}
    for item in chunk.items:
        for ref in (item.image, item.caption):
            if ref and ref[0] == "url":
                wanted.setdefault(ref[1], set()).add(ref[2])
    if not wanted:
        return chunk
    found = {url: _stream_members(url, names) for url, names in wanted.items()}

    def held(ref):
        if not ref or ref[0] != "url":
            return ref
        data = found[ref[1]].get(ref[2])
        return ("bytes", data, *ref[3:]) if data is not None else ("lost", *ref[1:])

    return Chunk(chunk.index, tuple(replace(it, image=held(it.image), caption=held(it.caption)) for it in chunk.items))


def _read_ref(ref: tuple, what: str) -> bytes:
    kind = ref[0]
    if kind in ("bytes", "url"):
        data = ref[1] if kind == "bytes" else _stream_members(ref[1], {ref[2]}).get(ref[2])
        if data is None:
            raise Reject(f"truncated tar stream: {what} member {ref[2]!r} is not in {ref[1]!r}")
        if not data:
            raise Reject(f"zero-byte {what} member")
        return data
    if kind == "lost":
        raise Reject(f"truncated tar stream: {what} member {ref[2]!r} is not in {ref[1]!r}")
    try:
        if kind == "file":
            with open(ref[1], "rb") as f:
                data = f.read()
            if not data:
                raise Reject(f"zero-byte {what} file")
            return data
        if kind == "tar":
            _, path, offset, size = ref[:4]
            with open(path, "rb") as f:
                f.seek(offset)
                data = f.read(size)
            if len(data) < size:
                raise Reject(f"truncated tar member: {what} has {len(data)} of {size} bytes")
            if not data:
                raise Reject(f"zero-byte {what} member")
            return data
    except OSError as e:
        raise Reject(f"cannot read {what}: {e}") from e
    raise ValueError(f"unknown {what} reference {ref!r}")


def _caption(item: Item) -> tuple[str, dict]:
    ref, meta = item.caption, dict(item.meta)
    if ref is None:
        raise Reject("missing caption (no .txt/.json sidecar or captions.jsonl entry)")
    if ref[0] == "text":
        text = ref[1]
    else:
        ext = {"tar": 4, "url": 3, "bytes": 2, "lost": 3}.get(ref[0])
        ext = ref[ext] if ext is not None else ref[1].rsplit(".", 1)[-1].lower()
        try:
            raw = _read_ref(ref, "caption").decode("utf-8")
        except UnicodeDecodeError as e:
            raise Reject(f"caption is not UTF-8: {e}") from e
        if ext == "json":
            try:
                entry = json.loads(raw)
                text = entry["caption"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise Reject(f"caption JSON without a 'caption' field ({e!r})") from e
            meta.update({k: v for k, v in entry.items() if k != "caption"})
        else:
            text = raw
    if not isinstance(text, str) or not text.strip():
        raise Reject(f"empty caption ({text!r})")
    return text.strip(), meta


def _to_rgb(image: Image.Image) -> Image.Image:
    # Transparent pixels keep whatever colour the file stored under them (often black);
    # compositing on white is what a viewer shows.
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


def load_item(item: Item, cfg) -> tuple[Image.Image, str, dict]:
    """(RGB image, caption, metadata) of a valid input; raises Reject(reason) otherwise.

    `cfg` gives the size limits: min_side, max_side, max_aspect (data.writer.WriterConfig).
    """
    if item.image[0] == "shapes":
        _, size, seed, index, *stream = item.image
        world = SHAPES_STREAMS[stream[0] if stream else "shapes"](int(size), int(seed))
        image_HWC, caption = world.sample(int(index))
        return Image.fromarray(image_HWC), caption, {"orig_size": [int(size), int(size)]}
    data = _read_ref(item.image, "image")
    caption, meta = _caption(item)
    # Decoders of untrusted files fail in many ways (OSError, SyntaxError, ValueError,
    # DecompressionBombError, struct.error, ...): any failure means "not an image we can use".
    try:
        with Image.open(io.BytesIO(data)) as probe:
            probe.verify()  # structure and checksums, without decoding pixels
        image = Image.open(io.BytesIO(data))
        w, h = image.size  # from the header: absurd sizes are refused before decoding
    except Image.UnidentifiedImageError as e:
        raise Reject("undecodable image: not a known image format") from e
    except Exception as e:  # noqa: BLE001 (see above)
        raise Reject(f"undecodable image: {type(e).__name__}: {e}") from e
    if min(h, w) < cfg.min_side:
        raise Reject(f"image too small: {h}x{w} (min side {cfg.min_side})")
    if max(h, w) > cfg.max_side:
        raise Reject(f"image too large: {h}x{w} (max side {cfg.max_side})")
    if max(h, w) / min(h, w) > cfg.max_aspect:
        raise Reject(f"aspect ratio {max(h, w) / min(h, w):.2f} of {h}x{w} exceeds {cfg.max_aspect}")
    try:
        image.load()  # a truncated JPEG/PNG fails here
        image = ImageOps.exif_transpose(image)  # camera photos are stored sideways with a rotation tag
    except Exception as e:  # noqa: BLE001
        raise Reject(f"undecodable image: {type(e).__name__}: {e}") from e
    return _to_rgb(image), caption, {**meta, "orig_size": [h, w]}
