import numpy as np
import pytest
import torch
from PIL import Image

from training.config import PREPROCESSING_VERSION
from training.data.embedding_cache import EmbeddingCache, cache_key, weights_fingerprint


class CountingEncoder:
    """A stand-in frozen encoder: B×3×L×L → B×4×8×8, deterministic, counts the images it sees."""

    def __init__(self, offset: float = 0.0) -> None:
        self.calls = 0
        self.images = 0
        self.offset = offset

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        assert batch.ndim == 4 and batch.shape[1] == 3 and batch.shape[2] == batch.shape[3] == 256
        self.calls += 1
        self.images += batch.shape[0]
        pooled = torch.nn.functional.adaptive_avg_pool2d(batch, 8)
        return torch.cat([pooled, pooled[:, :1] + self.offset], dim=1)


def _image(seed: int, shape=(60, 80)) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def test_key_depends_on_everything():
    image = _image(0)
    base = cache_key(image, "litemedsam")
    assert base.startswith("litemedsam/") and len(base.split("/")[1]) == 64
    assert cache_key(image.copy(), "litemedsam", PREPROCESSING_VERSION) == base
    changed = image.copy()
    changed[0, 0] ^= 1
    others = {
        cache_key(changed, "litemedsam"),
        cache_key(image, "sam_vit_b"),
        cache_key(image, "litemedsam", preprocessing_version=PREPROCESSING_VERSION + "-next"),
        cache_key(image, "litemedsam", weights_fingerprint="abc"),
        cache_key(image.astype(np.uint16), "litemedsam"),
        cache_key(image.reshape(80, 60), "litemedsam"),
        cache_key(image.tobytes(), "litemedsam"),
    }
    assert base not in others and len(others) == 7
    with pytest.raises(ValueError):
        cache_key(image, "../etc")


def test_get_put_and_no_stale_hits(tmp_path):
    cache = EmbeddingCache(tmp_path)
    encoder = CountingEncoder()
    image = _image(1)
    first = cache.get_or_compute(image, "litemedsam", encoder)
    assert first.shape == (4, 8, 8) and first.dtype == torch.float32 and encoder.images == 1
    again = cache.get_or_compute(image, "litemedsam", encoder)
    assert torch.equal(first, again) and encoder.images == 1 and cache.hits == 1
    key = cache.key(image, "litemedsam")
    path = cache.path(key)
    assert path.is_file() and path.parent.parent.name == "litemedsam"
    assert path.parent.name == key.split("/")[1][:2] and path.name == key.split("/")[1] + ".pt"
    assert not list(path.parent.glob("*.tmp"))
    # Other pixels / preprocessing version / weights: a miss, recomputed by the (new) encoder.
    changed = image.copy()
    changed[10, 10] = 255 - changed[10, 10]
    cache.get_or_compute(changed, "litemedsam", encoder)
    assert encoder.images == 2
    newer = EmbeddingCache(tmp_path, preprocessing_version=PREPROCESSING_VERSION + "-next")
    retrained = CountingEncoder(offset=5.0)
    assert newer.get(newer.key(image, "litemedsam")) is None
    fresh = newer.get_or_compute(image, "litemedsam", retrained)
    assert retrained.images == 1 and not torch.equal(fresh, first)
    reweighted = EmbeddingCache(tmp_path, weights_fingerprint="other-weights")
    assert reweighted.get(reweighted.key(image, "litemedsam")) is None
    assert torch.equal(cache.get(key), first)  # the original entry is untouched


def test_corrupt_files_are_misses_and_recomputed(tmp_path, caplog):
    cache = EmbeddingCache(tmp_path)
    encoder = CountingEncoder()
    image = _image(2)
    reference = cache.get_or_compute(image, "litemedsam", encoder)
    key = cache.key(image, "litemedsam")
    path = cache.path(key)
    for damage in (
        lambda: path.write_bytes(path.read_bytes()[: path.stat().st_size // 2]),  # truncated
        lambda: path.write_bytes(b"garbage"),
        lambda: torch.save({"format": "ultrarefiner-embedding", "key": "litemedsam/" + "0" * 64}, path),
        lambda: torch.save({"format": "x", "key": key, "embedding": torch.ones(2)}, path),
        lambda: torch.save(
            {"format": "ultrarefiner-embedding", "key": key, "embedding": torch.full((2,), float("nan"))},
            path,
        ),
    ):
        damage()
        assert cache.get(key) is None and not path.exists()
        before = encoder.images
        assert torch.equal(cache.get_or_compute(image, "litemedsam", encoder), reference)
        assert encoder.images == before + 1
    # A stored file under another key's name (e.g. copied by hand) is also rejected.
    other = cache.key(_image(3), "litemedsam")
    cache.path(other).parent.mkdir(parents=True, exist_ok=True)
    cache.path(other).write_bytes(path.read_bytes())
    assert cache.get(other) is None
    assert "corrupt" in caplog.text


def test_half_precision_and_refiner_object(tmp_path):
    encoder = CountingEncoder()

    class FakeRefiner:
        backbone = "litemedsam"

        def encode(self, batch):
            return encoder(batch)

    cache = EmbeddingCache(tmp_path, half=True)
    image = np.stack([_image(4)] * 3, axis=-1)
    computed = cache.get_or_compute(image, FakeRefiner())
    stored = torch.load(cache.path(cache.key(image, "litemedsam")), weights_only=True)["embedding"]
    assert stored.dtype == torch.float16
    loaded = cache.get_or_compute(image, FakeRefiner())
    assert loaded.dtype == torch.float32 and torch.equal(loaded, computed) and encoder.images == 1


def test_compute_many(tmp_path):
    cache = EmbeddingCache(tmp_path / "cache")
    encoder = CountingEncoder()
    images = [_image(k, shape=(50 + k, 70)) for k in range(5)]
    path = tmp_path / "img.png"
    Image.fromarray(images[4]).save(path)
    cache.get_or_compute(images[0], "litemedsam", encoder)
    seen = []
    keys = cache.compute_many(
        images[:4] + [path], "litemedsam", encoder, batch_size=2, progress=lambda d, t: seen.append((d, t))
    )
    # images[0] was cached already: 4 misses (images 1–3 and the PNG of images[4]).
    assert len(keys) == 5 and keys[0] == cache.key(images[0], "litemedsam")
    assert seen[0] == (0, 4) and seen[-1] == (4, 4)
    assert encoder.images == 1 + 4
    stacked = cache.load_many(keys)
    assert stacked.shape == (5, 4, 8, 8)
    for image, embedding in zip(images[:4], stacked, strict=False):
        assert torch.equal(embedding, cache.get_or_compute(image, "litemedsam", encoder))
    assert encoder.images == 5
    assert cache.compute_many(images, "litemedsam", encoder) == keys[:4] + [keys[4]]
    assert encoder.images == 5
    with pytest.raises(KeyError, match="not cached"):
        cache.load_many([cache.key(_image(99), "litemedsam")])


def test_a_batched_embedding_is_stored_alone(tmp_path):
    # An embedding computed in a batch is a view of the batch's storage; the file holds only its own
    # values (it used to hold the whole batch: 4× the disk with batches of 4).
    cache = EmbeddingCache(tmp_path / "cache")
    big = lambda batch: batch.repeat(1, 86, 1, 1)[:, :256]  # noqa: E731  B×256×256×256
    keys = cache.compute_many([_image(k) for k in range(4)], "litemedsam", big, batch_size=4)
    one_embedding = 256 * 256 * 256 * 4
    for key in keys:
        assert one_embedding < cache.path(key).stat().st_size < 1.1 * one_embedding


def test_weights_fingerprint_changes_with_weights():
    module = torch.nn.Linear(3, 2)
    state = {k: v.clone() for k, v in module.state_dict().items()}
    first = weights_fingerprint(state)
    assert first == weights_fingerprint(module.state_dict())
    state["bias"][0] += 1
    assert weights_fingerprint(state) != first
