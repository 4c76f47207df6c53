import hashlib
import json
import os
import pickle

import numpy as np
import pytest
import torch

from resampling_forcing.data import synthetic as S
from resampling_forcing.data import synthetic_dataset as SD
from resampling_forcing.data.latents import INDEX_NAME, LatentDataset, precompute, shard_name
from resampling_forcing.data.video import VideoClipDataset


class PoolVAE:
    """Tiny stand-in for the Wan VAE: 4x temporal (1 + 4k -> 1 + k), 8x spatial average pooling."""

    def __init__(self, fail_after=None):
        self.calls = 0
        self.fail_after = fail_after

    def encode(self, video):
        if self.fail_after is not None and self.calls >= self.fail_after:
            raise KeyboardInterrupt("simulated interruption")
        self.calls += 1
        b, c, f, h, w = video.shape
        first = video[:, :, :1]
        rest = video[:, :, 1:]
        rest = rest.reshape(b, c, (f - 1) // 4, 4, h, w).mean(3) if f > 1 else rest
        x = torch.cat([first, rest], 2)
        x = torch.nn.functional.avg_pool3d(x, (1, 8, 8))
        return torch.cat([x, -x], 1)  # [B, 6, 1 + k, h/8, w/8]


class HashText:
    """Deterministic 'text encoder': one hashed vector per word, zero-padded to 6 tokens."""

    def encode(self, captions):
        out = torch.zeros(len(captions), 6, 8)
        for i, cap in enumerate(captions):
            for j, word in enumerate(cap.split()[:6]):
                seed = int(hashlib.sha1(word.encode()).hexdigest()[:8], 16)
                out[i, j] = torch.randn(8, generator=torch.Generator().manual_seed(seed))
        return out


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    d = tmp_path_factory.mktemp("lat_src")
    m = SD.make_dataset(d, num_videos=7, frames=9, size=32, fps=8, seed=1, held_out_fraction=0.0)
    rows = [json.loads(x) for x in m.read_text().splitlines()]
    (d / "broken.mp4").write_bytes(os.urandom(1000))
    rows.insert(3, {"path": "broken.mp4", "caption": "a red circle bouncing"})
    m.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return m


def _ds(manifest):
    return VideoClipDataset(manifest, num_frames=9, height=32, width=32, fps=8, random_start=False)


def test_precompute_and_read(manifest, tmp_path, capsys):
    ds = _ds(manifest)
    out = tmp_path / "lat"
    index = precompute(ds, PoolVAE(), HashText(), out, shard_size=3, batch_size=2, progress=False)
    printed = capsys.readouterr().out
    assert "7 of 8 videos" in printed and "1 skipped" in printed
    assert index["complete"] and index["num_items"] == 7 and index["num_shards"] == 3
    assert index["latent_shape"] == [6, 3, 4, 4] and index["text_shape"] == [6, 8]
    assert sum(index["bad_files"].values()) == 1
    assert json.loads((out / INDEX_NAME).read_text()) == index
    lat = LatentDataset(out)
    assert len(lat) == 7
    good = [i for i in range(len(ds)) if ds.try_get(i) is not None]
    for k, i in enumerate(good):
        item = lat[k]
        assert item["index"] == i and item["caption"] == ds.rows[i]["caption"]
        assert item["latents"].shape == (6, 3, 4, 4) and item["text"].shape == (6, 8)
        expect = PoolVAE().encode(ds[i]["video"][None])[0]
        torch.testing.assert_close(item["latents"], expect)
        torch.testing.assert_close(item["text"], HashText().encode([item["caption"]])[0])
    # picklable for DataLoader workers, even after handles are open
    lat2 = pickle.loads(pickle.dumps(lat))
    torch.testing.assert_close(lat2[3]["latents"], lat[3]["latents"])
    batch = next(iter(torch.utils.data.DataLoader(lat, batch_size=4)))
    assert batch["latents"].shape == (4, 6, 3, 4, 4) and len(batch["caption"]) == 4
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temp files


def test_resume_after_interruption(manifest, tmp_path, capsys):
    ds = _ds(manifest)
    out = tmp_path / "lat"
    with pytest.raises(KeyboardInterrupt):
        # shard 0 = rows 0..2 (3 videos), shard 1 = rows 3..5 (broken + 2 videos): dies in shard 1
        precompute(ds, PoolVAE(fail_after=4), HashText(), out, shard_size=3, batch_size=1, progress=False)
    assert (out / shard_name(0)).is_file() and not (out / shard_name(1)).is_file()
    idx = json.loads((out / INDEX_NAME).read_text())
    assert not idx["complete"] and [s["file"] for s in idx["shards"]] == [shard_name(0)]
    assert not [p for p in out.iterdir() if p.name.startswith(".")]
    mtime0 = (out / shard_name(0)).stat().st_mtime_ns
    vae = PoolVAE()
    capsys.readouterr()
    index = precompute(ds, vae, HashText(), out, shard_size=3, batch_size=1, progress=False)
    assert vae.calls == 4  # only the 4 good videos of shards 1 and 2 were encoded
    printed = capsys.readouterr().out
    assert "7 of 8 videos" in printed and "4 encoded now in 2 shard(s), 3 reused from 1 shard(s)" in printed, printed
    assert index["complete"] and index["num_items"] == 7 and index["bad_files"]
    assert (out / shard_name(0)).stat().st_mtime_ns == mtime0
    full = tmp_path / "full"
    precompute(ds, PoolVAE(), HashText(), full, shard_size=3, progress=False)
    a, b = LatentDataset(out), LatentDataset(full)
    for i in range(len(a)):
        torch.testing.assert_close(a[i]["latents"], b[i]["latents"])
    # a shard written just before a crash but not yet in the index is adopted
    (out / INDEX_NAME).unlink()
    vae = PoolVAE()
    capsys.readouterr()
    index = precompute(ds, vae, HashText(), out, shard_size=3, progress=False)
    assert vae.calls == 0 and index["num_items"] == 7 and sum(index["bad_files"].values()) == 1
    printed = capsys.readouterr().out
    assert "all 3 shard(s) reused from an earlier run, nothing encoded" in printed and "encoded now" not in printed


def test_mismatch_dtype_and_errors(manifest, tmp_path):
    ds = _ds(manifest)
    out = tmp_path / "lat"
    precompute(ds, PoolVAE(), HashText(), out, shard_size=4, dtype=torch.float16, progress=False)
    lat = LatentDataset(out)
    assert lat[0]["latents"].dtype == torch.float16
    with pytest.raises(ValueError, match="different"):
        precompute(ds, PoolVAE(), HashText(), out, shard_size=3, progress=False)
    precompute(ds, PoolVAE(), HashText(), out, shard_size=3, overwrite=True, progress=False)
    assert LatentDataset(out)[0]["latents"].dtype == torch.float32
    with pytest.raises(ValueError, match="index.json"):
        LatentDataset(tmp_path / "nowhere")
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / INDEX_NAME).write_text(json.dumps({"shards": [], "bad_files": {"corrupt": 3}}))
    with pytest.raises(ValueError, match="no items"):
        LatentDataset(empty)


def test_generic_dataset_of_tuples(tmp_path):
    class Tuples(torch.utils.data.Dataset):
        def __len__(self):
            return 5

        def __getitem__(self, i):
            if i == 2:
                raise OSError("unreadable")
            return torch.full((3, 5, 16, 16), i / 10.0), f"a red circle {i}"

    index = precompute(Tuples(), PoolVAE(), HashText(), tmp_path / "t", shard_size=2, progress=False)
    assert index["num_items"] == 4 and index["bad_files"] == {"OSError": 1}
    lat = LatentDataset(tmp_path / "t")
    assert [lat[i]["caption"] for i in range(4)] == [f"a red circle {i}" for i in (0, 1, 3, 4)]
    assert np.isclose(lat[2]["latents"][0].mean().item(), 0.3)


def test_encoder_settings_in_the_fingerprint(manifest, tmp_path):
    """precompute records the encoder settings (not their paths) and refuses to resume a store made with
    other settings; a store begun before they were recorded resumes as it is."""
    ds = _ds(manifest)
    out = tmp_path / "lat"
    enc = {"vae": "pixel_shuffle", "vae_factor": 4, "vae_path": "/a", "text": "hash", "text_ngram": 2}
    index = precompute(ds, PoolVAE(), HashText(), out, shard_size=3, progress=False, encoders=enc)
    assert index["fingerprint"]["encoders"] == {k: v for k, v in enc.items() if k != "vae_path"}
    precompute(ds, PoolVAE(), HashText(), out, shard_size=3, progress=False, encoders=dict(enc, vae_path="/moved"))
    with pytest.raises(ValueError, match="different data set/config"):
        precompute(ds, PoolVAE(), HashText(), out, shard_size=3, progress=False, encoders=dict(enc, text_ngram=1))
    old = json.loads((out / INDEX_NAME).read_text())
    del old["fingerprint"]["encoders"]  # as written before the settings were recorded
    (out / INDEX_NAME).write_text(json.dumps(old))
    vae = PoolVAE()
    index = precompute(ds, vae, HashText(), out, shard_size=3, progress=False, encoders=enc)
    assert vae.calls == 0 and "encoders" not in index["fingerprint"]  # reused, and no claim made about them


def test_an_edited_manifest_is_another_data_set(manifest, tmp_path):
    """The rows' paths and captions are in the fingerprint: resuming after the manifest was edited (same
    row count) is refused (it reused the old shards, whose captions no longer matched); a store begun
    before the digest was recorded resumes as it is."""
    out = tmp_path / "lat"
    precompute(_ds(manifest), PoolVAE(), HashText(), out, shard_size=3, progress=False)
    ds = _ds(manifest)
    ds.rows[0] = dict(ds.rows[0], caption="a green square bouncing")  # the same folder, one caption edited
    with pytest.raises(ValueError, match="different data set/config"):
        precompute(ds, PoolVAE(), HashText(), out, shard_size=3, progress=False)
    old = json.loads((out / INDEX_NAME).read_text())
    del old["fingerprint"]["rows_sha256"]  # as written before the digest was recorded
    (out / INDEX_NAME).write_text(json.dumps(old))
    vae = PoolVAE()
    precompute(_ds(manifest), vae, HashText(), out, shard_size=3, progress=False)
    assert vae.calls == 0


class ShortText(HashText):
    """Another text encoder: 3 tokens instead of 6."""

    def encode(self, captions):
        return super().encode(captions)[:, :3] + 1.0


def test_store_holds_its_encoders_empty_prompt(manifest, tmp_path):
    """The empty prompt's embedding is written with the store by the encoder that made it, and replaced by
    --overwrite (a stale one of another text length crashed text dropout; one from another encoder of the
    same length was used silently)."""
    from safetensors.torch import load_file

    from resampling_forcing.data.latents import NULL_TEXT_FILE

    out = tmp_path / "lat"
    precompute(_ds(manifest), PoolVAE(), HashText(), out, shard_size=4, progress=False)
    assert torch.equal(load_file(str(out / NULL_TEXT_FILE))["text"], HashText().encode([""])[0])
    precompute(_ds(manifest), PoolVAE(), ShortText(), out, shard_size=4, overwrite=True, progress=False)
    null = load_file(str(out / NULL_TEXT_FILE))["text"]
    assert torch.equal(null, ShortText().encode([""])[0]) and list(null.shape) == LatentDataset(out).index["text_shape"]
