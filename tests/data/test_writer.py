"""Shard writer: lossless round trip, rejects with reasons, crash-safe restart, index counts,
webdataset tars read by path or URL and shards written with its TarWriter."""

import hashlib
import io
import json
import os
import tarfile
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image

from data.buckets import Buckets, bucket_key
from data.latents import PixelLatents
from data.shard_inputs import Chunk, list_chunks
from data.shard_loader import ShardIndex, ShardLoader, ShardReader
from data.writer import WriterConfig, build_index, write_chunk, write_shards

# Buckets at 64² in steps of 16: 80x48, 64x64, 48x80.
CFG = WriterConfig(resolution=64, bucket_multiple=16, min_side=16, max_aspect=4.0, micro_batch=3)
# float16 keeps 11 significant bits: a stored value is within 2^-11 of the float32 one,
# relatively (normal range), or within 2^-25 absolutely (subnormals). The encoders run in
# micro-batches, whose float32 rounding may differ from a one-prompt call by ~1e-6.
FP16 = dict(rtol=2.0 ** -11 + 1e-5, atol=1e-6)


def _image(h: int, w: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    # Smooth content (a gradient plus a few blocks), so JPEG stays close to the source.
    base = np.linspace(0, 255, w)[None, :, None] * np.ones((h, 1, 3)) * rng.uniform(0.3, 1, 3)
    return Image.fromarray(base.astype(np.uint8))


def _png_bytes(image: Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt)
    return buf.getvalue()


CAPTIONS = ["a red circle", "a blue square above a green circle", "a yellow triangle",
            "an orange square to the left of a purple circle", "a green triangle below a red square"]
SIZES = [(64, 64), (48, 96), (96, 48), (70, 60), (40, 100), (100, 50)]


def _make_folder(root, n: int = 12) -> dict[str, tuple[tuple[int, int], str]]:
    """n good images with the three caption styles; returns {key: ((h, w), caption)}."""
    os.makedirs(root / "sub", exist_ok=True)
    expected, jsonl = {}, {root: [], root / "sub": []}
    for i in range(n):
        h, w = SIZES[i % len(SIZES)]
        caption = CAPTIONS[i % len(CAPTIONS)]
        folder = root / "sub" if i % 4 == 3 else root
        stem, ext = f"img{i:03d}", "jpg" if i % 3 == 0 else "png"
        _image(h, w, i).save(folder / f"{stem}.{ext}")
        if i % 3 == 0:
            (folder / f"{stem}.txt").write_text(caption + "\n")
        elif i % 3 == 1:
            (folder / f"{stem}.json").write_text(json.dumps({"caption": caption, "url": f"http://x/{i}"}))
        else:
            jsonl[folder].append(json.dumps({"file": f"{stem}.{ext}", "caption": caption}))
        key = f"sub/{stem}" if folder != root else stem
        expected[key] = ((h, w), caption)
    for folder, lines in jsonl.items():
        (folder / "captions.jsonl").write_text("".join(line + "\n" for line in lines))
    return expected


def _all_samples(out_dir) -> list[tuple[dict, dict]]:
    index = ShardIndex(str(out_dir))
    reader = ShardReader(index, text_len=index.meta["max_text"])
    return [reader.sample(i) for i in range(index.total)]


def _tar_keys(out_dir) -> list[str]:
    keys = []
    for name in sorted(os.listdir(out_dir)):
        if name.endswith(".tar"):
            with tarfile.open(os.path.join(out_dir, name)) as tar:
                keys += [m.name.split(".")[0] for m in tar if m.name.endswith(".json")]
    return keys


def test_round_trip_equals_a_direct_encode(tmp_path, encoder):
    expected = _make_folder(tmp_path / "in")
    latents, buckets = PixelLatents(), CFG.buckets()
    index = write_shards(str(tmp_path / "in"), str(tmp_path / "out"), latents, encoder, CFG, chunk_size=5,
                         progress=None)
    assert index["total"] == len(expected) and index["chunks"] == 3
    samples = _all_samples(tmp_path / "out")
    assert sorted(r["source"] for r, _ in samples) == sorted(expected)
    for record, arrays in samples:
        (h, w), caption = expected[record["source"]]
        assert record["caption"] == caption and record["orig_size"] == [h, w]
        bucket = buckets.assign(h, w)
        assert record["bucket"] == list(buckets[bucket])
        # Re-read the source image itself (JPEG decoding is deterministic) and encode it directly.
        src = tmp_path / "in" / f"{record['source']}.{'jpg' if int(record['source'][-3:]) % 3 == 0 else 'png'}"
        pixels = np.array(buckets.resize_crop(Image.open(src).convert("RGB"), bucket))
        direct = latents.encode(torch.from_numpy(pixels).permute(2, 0, 1)[None].float() / 127.5 - 1)[0]
        assert arrays["latent"].dtype == np.float16
        assert torch.equal(torch.from_numpy(arrays["latent"]), direct.half())  # one rounding, nothing else
        feats, mask = encoder.encode([caption])
        torch.testing.assert_close(torch.from_numpy(arrays["text"]).float(), feats[0][mask[0]], **FP16)
    assert "url" in next(r for r, _ in samples if r["source"] == "img001")  # sidecar JSON metadata kept

    # Through the loader: padded back to the encoder's own layout, mask bitwise equal.
    loader = ShardLoader(str(tmp_path / "out"), batch_size=1, text_len=encoder.max_len, num_workers=0)
    reader = ShardReader(loader.index, encoder.max_len)
    for _ in range(len(expected)):
        batch = next(loader)
        record, _ = reader.sample(int(batch.sample_ids[0]) % loader.index.total)
        feats, mask = encoder.encode([record["caption"]])
        assert batch.captions == [record["caption"]]
        assert torch.equal(batch.text_mask[0], mask[0])
        torch.testing.assert_close(batch.text[0], feats[0], **FP16)
        assert batch.text.dtype == batch.latents.dtype == torch.float32


def test_index_counts_per_bucket(tmp_path, encoder):
    expected = _make_folder(tmp_path / "in", n=14)
    index = write_shards(str(tmp_path / "in"), str(tmp_path / "out"), PixelLatents(), encoder, CFG, chunk_size=4,
                         progress=None)
    buckets = CFG.buckets()
    want = Counter(bucket_key(buckets[buckets.assign(h, w)]) for (h, w), _ in expected.values())
    got = Counter()
    for shard in index["shards"]:
        got.update(shard["buckets"])
        assert shard["samples"] == len(shard["members"]) == sum(shard["buckets"].values())
    assert got == want and len(want) == 3
    assert index["buckets"] == [[80, 48], [64, 64], [48, 80]]
    # Members' bucket ids agree with each sample's own record.
    reader = ShardReader(ShardIndex(str(tmp_path / "out")), 64)
    for i, bucket in enumerate(reader.index.bucket):
        assert reader.sample(i)[0]["bucket"] == index["buckets"][bucket]
    assert index["latents"] == {"kind": "pixels", "channels": 3, "downsample": 1}
    assert index["text"]["layers"] == [1, 2, 3, 4] and index["text"]["dim"] == 128
    empty = np.load(tmp_path / "out" / "empty_text.npy")
    feats, mask = encoder.encode([""])
    torch.testing.assert_close(torch.from_numpy(empty).float(), feats[0][mask[0]], **FP16)


def test_bad_inputs_are_rejected_with_reasons_and_the_rest_written(tmp_path, encoder):
    root = tmp_path / "in"
    good = _make_folder(root, n=4)
    noisy = Image.fromarray(np.random.default_rng(0).integers(0, 256, (128, 128, 3), dtype=np.uint8))
    jpeg = _png_bytes(noisy, "JPEG")
    (root / "truncated.jpg").write_bytes(jpeg[: len(jpeg) * 2 // 3])  # headers intact, scan data cut
    (root / "truncated.txt").write_text("a red circle")
    (root / "empty.png").write_bytes(b"")
    (root / "empty.txt").write_text("a red circle")
    (root / "garbage.png").write_bytes(os.urandom(300))
    (root / "garbage.txt").write_text("a red circle")
    _image(64, 64, 5).save(root / "nocaption.png")
    _image(64, 64, 6).save(root / "blankcaption.png")
    (root / "blankcaption.txt").write_text("  \n")
    _image(8, 8, 7).save(root / "tiny.png")
    (root / "tiny.txt").write_text("a red circle")
    _image(20, 200, 8).save(root / "sliver.png")
    (root / "sliver.txt").write_text("a red circle")
    # A webdataset shard cut inside its second image: the first group survives.
    with tarfile.open(root / "web.tar", "w") as tar:
        for i, caption in enumerate(["a blue square", "a green circle"]):
            for name, data in ((f"s{i}.png", _png_bytes(_image(64, 64, 20 + i))), (f"s{i}.txt", caption.encode())):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    data = (root / "web.tar").read_bytes()
    with tarfile.open(root / "web.tar") as tar:
        cut = [m for m in tar if m.name == "s1.png"][0].offset_data + 100
    (root / "web.tar").write_bytes(data[:cut])

    index = write_shards(str(root), str(tmp_path / "out"), PixelLatents(), encoder, CFG, chunk_size=100,
                         progress=None)
    rejects = {}
    for name in os.listdir(tmp_path / "out" / "rejects"):
        for line in (tmp_path / "out" / "rejects" / name).read_text().splitlines():
            entry = json.loads(line)
            rejects[entry["source"]] = entry["reason"]
    assert set(rejects) == {"truncated", "empty", "garbage", "nocaption", "blankcaption", "tiny", "sliver",
                            "web.tar/s1"}
    assert rejects["truncated"].startswith("undecodable image: OSError: image file is truncated")
    assert rejects["empty"] == "zero-byte image file"
    assert rejects["garbage"] == "undecodable image: not a known image format"
    assert rejects["nocaption"].startswith("missing caption")
    assert rejects["blankcaption"].startswith("empty caption")
    assert rejects["tiny"] == "image too small: 8x8 (min side 16)"
    assert rejects["sliver"] == "aspect ratio 10.00 of 20x200 exceeds 4.0"
    assert rejects["web.tar/s1"].startswith("truncated tar member: image has")
    written = sorted(r["source"] for r, _ in _all_samples(tmp_path / "out"))
    assert written == sorted(list(good) + ["web.tar/s0"])
    assert index["total"] == len(written)
    marker = json.loads((tmp_path / "out" / "done" / "chunk-000000.json").read_text())
    assert marker["inputs"] == len(written) + len(rejects) and marker["rejects"] == len(rejects)


class _CrashingLatents(PixelLatents):
    """Real pixel latents that die (like a killed process) on their n-th call."""

    kind = "pixels"  # the same latent space as PixelLatents, as far as the index is concerned

    def __init__(self, calls_before_crash: int):
        super().__init__()
        self.left = calls_before_crash

    def encode(self, images_BCHW):
        if self.left == 0:
            raise KeyboardInterrupt("simulated crash")
        self.left -= 1
        return super().encode(images_BCHW)


def test_restart_after_a_crash_neither_duplicates_nor_loses(tmp_path, encoder):
    expected = _make_folder(tmp_path / "in", n=12)
    out = str(tmp_path / "out")
    chunks = list_chunks(str(tmp_path / "in"), 4)
    assert [Chunk.from_json(json.loads(json.dumps(c.to_json()))) for c in chunks] == chunks  # job-row round trip
    # Chunk 0 completes; the crash hits chunk 1 between micro-batches (its tar is a .tmp).
    with pytest.raises(KeyboardInterrupt):
        write_shards(chunks, out, _CrashingLatents(calls_before_crash=4), encoder, CFG, progress=None)
    assert os.path.exists(os.path.join(out, "done", "chunk-000000.json"))
    assert os.path.exists(os.path.join(out, "chunk-000001-0000.tar.tmp"))
    assert not os.path.exists(os.path.join(out, "done", "chunk-000001.json"))
    # Chunk 2 crashed after its tar was renamed but before its marker: rewritten, not trusted.
    write_chunk(chunks[2], out, PixelLatents(), encoder, CFG)
    os.remove(os.path.join(out, "done", "chunk-000002.json"))
    done0 = os.stat(os.path.join(out, "chunk-000000-0000.tar")).st_mtime_ns

    index = write_shards(chunks, out, PixelLatents(), encoder, CFG, progress=None)
    keys = _tar_keys(out)
    assert len(keys) == len(set(keys)) == index["total"] == len(expected)
    assert sorted(r["source"] for r, _ in _all_samples(out)) == sorted(expected)
    assert not [n for n in os.listdir(out) if ".tmp" in n]
    assert os.stat(os.path.join(out, "chunk-000000-0000.tar")).st_mtime_ns == done0  # done chunks are skipped
    # A finished run is a no-op, and build_index alone gives the same index.
    again = write_shards(chunks, out, _CrashingLatents(calls_before_crash=0), encoder, CFG, progress=None)
    assert again == index == build_index(out)


def test_shapes_world_input_and_repa_features(tmp_path, encoder, world):
    from data.vision import VisionEncoder

    vision = VisionEncoder.tiny(seed=0, patch_size=8)
    cfg = WriterConfig(resolution=32, bucket_multiple=16, micro_batch=4)
    index = write_shards("shapes:6", str(tmp_path / "out"), PixelLatents(), encoder, cfg, vision=vision,
                         chunk_size=4, progress=None)
    assert index["total"] == 6 and index["buckets"] == [[32, 32]]
    assert index["repa"] == {"model": "VisionEncoder", "dim": vision.dim, "grid": "per sample"}
    for record, arrays in _all_samples(tmp_path / "out"):
        i = int(record["source"].split("/")[1])
        image, caption = world.sample(i)
        assert record["caption"] == caption and record["repa_grid"] == [4, 4]
        images = torch.from_numpy(image).permute(2, 0, 1)[None].float() / 127.5 - 1
        assert torch.equal(torch.from_numpy(arrays["latent"]), images[0].half())
        torch.testing.assert_close(torch.from_numpy(arrays["repa"]).float(), vision.encode(images)[0],
                                   rtol=2.0 ** -11 + 1e-4, atol=1e-5)


def test_mixing_encoders_in_one_directory_is_refused(tmp_path, encoder):
    _make_folder(tmp_path / "in", n=4)
    chunks = list_chunks(str(tmp_path / "in"), 2)
    out = str(tmp_path / "out")
    write_chunk(chunks[0], out, PixelLatents(), encoder, CFG)
    write_chunk(chunks[1], out, PixelLatents(), encoder, WriterConfig(resolution=64, bucket_multiple=32, min_side=16))
    with pytest.raises(ValueError, match="one encoder/latent/bucket configuration"):
        build_index(out)


def test_buckets_cover_aspect_ratios_at_about_the_target_area():
    for resolution in (256, 512, 1024):
        buckets = Buckets(resolution)
        assert (resolution, resolution) in buckets.sizes
        for h, w in buckets.sizes:
            assert h % 64 == 0 and w % 64 == 0 and (w, h) in buckets.sizes
            assert abs(h * w / resolution ** 2 - 1) <= 0.1 and max(h, w) / min(h, w) <= 2.0
    b = Buckets(1024)
    assert b[b.assign(1080, 1920)] == (768, 1344) and b[b.assign(3000, 1000)] == (1408, 704)
    image = b.resize_crop(_image(1080, 1920, 0), b.assign(1080, 1920))
    assert image.size == (1344, 768)


# ---- webdataset: tars by URL in, TarWriter out ------------------------------------------------
def _pinned_samples(repa: bool):
    for pos in range(5):
        rng = np.random.default_rng([11, pos])
        arrays = {"latent": rng.standard_normal((3, 4, 4 + 4 * (pos % 2))).astype(np.float16),
                  "text": rng.standard_normal((2 + pos, 2, 8)).astype(np.float16)}
        if repa:
            arrays["repa"] = rng.standard_normal((4, 6)).astype(np.float16)
        record = {"caption": f"caption {pos}", "source": f"in/{pos}", "bucket": [4, 4]}
        yield f"c000007-{pos:06d}", record, arrays, pos % 2


# The bytes of a shard: without repa features, those tarfile wrote before shards were written
# with webdataset's TarWriter (the same format, byte for byte); with them, TarWriter's
# member order (json, latent, repa, text: by name).
TAR_SHA = {False: "8fe707567a1dcfa476691f679a7d8fd6ba4741fdfad750a2e93687da8248636b",
           True: "9ceaa20b4630360758e89c3a64e7216dbb2a7e3f00e567db4d0178fc248f7f55"}


@pytest.mark.parametrize("repa", [False, True])
def test_shards_written_with_tarwriter_keep_the_format_offsets_and_checksum(tmp_path, repa):
    from data.writer import write_tar

    path = tmp_path / "chunk-000007-0000.tar"
    entry = write_tar(str(path), _pinned_samples(repa))
    data = path.read_bytes()
    assert entry["sha256"] == hashlib.sha256(data).hexdigest() == TAR_SHA[repa] and entry["bytes"] == len(data)
    # Each sample's offset and size, by Python's own tar reader: the header of its first
    # member, up to the header of the next sample's first member.
    with tarfile.open(path) as tar:
        members = tar.getmembers()
    fields = ["json", "latent.npy", "repa.npy", "text.npy"] if repa else ["json", "latent.npy", "text.npy"]
    assert [m.name for m in members] == [f"c000007-{p:06d}.{f}" for p in range(5) for f in fields]
    starts = [m.offset for m in members[::len(fields)]]
    ends = starts[1:] + [members[-1].offset_data + -(-members[-1].size // 512) * 512]
    assert entry["members"] == [[s, e - s, p % 2] for p, (s, e) in enumerate(zip(starts, ends))]
    # And through the loader's reader, which seeks to those offsets.
    out = tmp_path / "set"
    out.mkdir()
    path.rename(out / path.name)
    meta = {"format": "k2train-shards/1", "latents": {"kind": "pixels", "channels": 3, "downsample": 1},
            "text": {"layers": [1, 2], "dim": 8, "max_len": 8, "suffix": 0, "model": "x"},
            "buckets": [[4, 4], [4, 8]], "repa": {"model": "x", "dim": 6, "grid": "per sample"} if repa else None}
    from data.writer import write_done, write_empty_text

    write_empty_text(str(out), np.zeros((1, 2, 8), np.float32))
    write_done(str(out), "chunk-000007", [entry], [], meta, 5)
    build_index(str(out))
    reader = ShardReader(ShardIndex(str(out)), text_len=8)
    for i, (key, record, arrays, _) in enumerate(_pinned_samples(repa)):
        got_record, got = reader.sample(i)
        assert got_record == record and sorted(got) == sorted(arrays)
        assert all(np.array_equal(got[k], arrays[k]) for k in arrays)
    ShardLoader(str(out), batch_size=1, text_len=8, num_workers=0, verify="checksum")  # sha256 verified


def _web_tar(path, start: int, n: int) -> None:
    """A webdataset tar of n captioned PNGs: keys s<start>..., captions as .txt or .json."""
    with tarfile.open(path, "w") as tar:
        for i in range(start, start + n):
            caption = CAPTIONS[i % len(CAPTIONS)]
            side = (f"s{i}.json", json.dumps({"caption": caption, "id": i}).encode()) if i % 2 else \
                (f"s{i}.txt", caption.encode())
            for name, data in ((f"s{i}.png", _png_bytes(_image(*SIZES[i % len(SIZES)], 40 + i))), side):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def test_a_pipe_url_input_gives_the_samples_of_the_local_path(tmp_path, encoder):
    from data.shard_inputs import list_inputs

    _web_tar(tmp_path / "web-0.tar", 0, 4)
    _web_tar(tmp_path / "web-1.tar", 4, 3)
    local, piped = str(tmp_path / "web-0.tar"), f"pipe:cat {tmp_path / 'web-0.tar'}"
    assert [it.key for it in list_inputs(piped)] == [it.key for it in list_inputs(local)] == \
        [f"web-0.tar/s{i}" for i in range(4)]
    assert list_inputs(local)[0].image[0] == "tar" and list_inputs(piped)[0].image == ("url", piped, "s0.png")
    for spec, name in ((local, "local"), (piped, "piped")):
        write_shards(spec, str(tmp_path / name), PixelLatents(), encoder, CFG, chunk_size=3, progress=None)
    a, b = _all_samples(tmp_path / "local"), _all_samples(tmp_path / "piped")
    assert len(a) == 4 and [r for r, _ in a] == [r for r, _ in b]
    assert next(r for r, _ in a if r["source"] == "web-0.tar/s1")["id"] == 1  # the .json caption's fields kept
    for (_, x), (_, y) in zip(a, b):
        assert sorted(x) == sorted(y) and all(np.array_equal(x[k], y[k]) for k in x)
    # Braces expand to several tars, each streamed once, in order.
    keys = [it.key for it in list_inputs(f"pipe:cat {tmp_path}/web-{{0..1}}.tar")]
    assert keys == [f"web-0.tar/s{i}" for i in range(4)] + [f"web-1.tar/s{i}" for i in range(4, 7)]
    # A command that fails is named; a stream cut inside a member rejects what it lost.
    with pytest.raises(ValueError, match="input 'pipe:cat /no/such.tar': cannot be read as a tar stream"):
        list_inputs("pipe:cat /no/such.tar")
    with tarfile.open(tmp_path / "web-1.tar") as tar:
        cut = tar.getmember("s5.png").offset_data + 100
    cut_spec = f"pipe:head -c {cut} {tmp_path / 'web-1.tar'}"
    write_shards(cut_spec, str(tmp_path / "cut"), PixelLatents(), encoder, CFG, chunk_size=10, progress=None)
    rejects = [json.loads(line) for line in (tmp_path / "cut" / "rejects" / "chunk-000000.jsonl").open()]
    assert [(r["source"], r["reason"]) for r in rejects] == \
        [("web-1.tar/s5", f"truncated tar stream: image member 's5.png' is not in {cut_spec!r}")]
    assert [r["source"] for r, _ in _all_samples(tmp_path / "cut")] == ["web-1.tar/s4"]
