"""The pretrained image tower: EfficientNet-Lite0's ImageNet weights, installed by pip, classify known photos;
as a frozen item-tower encoder its features are computed once per catalog and read back from the disk cache."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from configs import load_config
from towers.image import EFFICIENTNET, EFFICIENTNET_WEIGHTS, EfficientNetFeatures, ImageEncoder

skimage_data = pytest.importorskip("skimage.data", reason="scikit-image (the dev extra) holds the sample photos")

# ImageNet classes: 281 tabby, 282 tiger cat, 285 Egyptian cat; 967 espresso, 968 cup.
CATS, COFFEE = {281, 282, 285}, {967, 968}
PRETRAINED = ["item.image.enabled=true", f"item.image.arch={EFFICIENTNET}", f"item.image.pretrained={EFFICIENTNET_WEIGHTS}",
              "item.image.trainable=false", "item.image.image_size=224"]


def _pixels(photo: np.ndarray, net: EfficientNetFeatures) -> torch.Tensor:
    from PIL import Image

    img = Image.fromarray(photo).convert("RGB").resize((224, 224), Image.BICUBIC)
    x = torch.tensor(np.asarray(img), dtype=torch.float32).permute(2, 0, 1)[None] / 255
    mean, std = torch.tensor(net.image_mean)[:, None, None], torch.tensor(net.image_std)[:, None, None]
    return (x - mean) / std


@pytest.fixture(scope="module")
def net() -> EfficientNetFeatures:
    return EfficientNetFeatures(EFFICIENTNET_WEIGHTS).eval()


def test_installed_weights_classify_known_photos(net: EfficientNetFeatures) -> None:
    with torch.no_grad():
        cat = net.classify(_pixels(skimage_data.chelsea(), net)).softmax(-1)[0]
        coffee = net.classify(_pixels(skimage_data.coffee(), net)).softmax(-1)[0]
    assert int(cat.argmax()) in CATS and float(cat[list(CATS)].sum()) > 0.8
    assert int(coffee.argmax()) in COFFEE and float(coffee[list(COFFEE)].sum()) > 0.8
    random = EfficientNetFeatures("").eval()  # the check can fail: random weights do not know a cat
    with torch.no_grad():
        assert float(random.classify(_pixels(skimage_data.chelsea(), random)).softmax(-1)[0][list(CATS)].sum()) < 0.1


def test_features_tell_photos_apart(net: EfficientNetFeatures) -> None:
    with torch.no_grad():
        f = net(torch.cat([_pixels(p, net) for p in (skimage_data.chelsea(), skimage_data.coffee(),
                                                     np.fliplr(skimage_data.chelsea()).copy())]))
    assert f.shape == (3, 1280)
    cos = torch.nn.functional.cosine_similarity
    assert cos(f[0], f[2], dim=0) > cos(f[0], f[1], dim=0) + 0.2  # the mirrored cat is nearer than the coffee


def test_image_encoder_is_frozen_and_stays_in_eval_mode() -> None:
    cfg = load_config("tiny", PRETRAINED).item.image
    enc = ImageEncoder(cfg)
    assert enc.feature_dim == 1280 and not any(p.requires_grad for p in enc.parameters())
    enc.train()
    assert not enc.visual.training  # batch-norm statistics stay those of ImageNet


def test_a_bad_weights_file_is_one_clear_error(tmp_path: Path) -> None:
    from errors import ModelLoadError

    bad = tmp_path / "w.pth"
    torch.save({"not": torch.zeros(1)}, bad)
    with pytest.raises(ModelLoadError, match="not EfficientNet-Lite0 weights"):
        EfficientNetFeatures(str(bad))
    with pytest.raises(ModelLoadError, match="no such weights file"):
        EfficientNetFeatures(str(tmp_path / "missing.pth"))


def test_frozen_image_features_come_from_the_disk_cache(tiny_catalog: Path, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    from data.catalog import load_catalog
    from towers.factory import build_towers, make_item_dataset
    from train.features import frozen_features

    monkeypatch.setenv("TOWERREC_CACHE", str(tmp_path / "cache"))
    config = load_config("tiny", [*PRETRAINED, "item.audio.enabled=false"])
    model = build_towers(config, num_ids=0).eval()
    dataset = make_item_dataset(load_catalog(tiny_catalog), model)
    rows = np.arange(len(dataset))[::-1].copy()  # every item, in reverse: the rows are picked in order
    first = frozen_features(model, dataset, "cpu", rows=rows, progress=False)
    files = list((tmp_path / "cache" / "features").glob("image-*.safetensors"))
    assert len(files) == 1
    calls = []
    monkeypatch.setattr(model.item.image, "forward", lambda pixels: calls.append(1))
    again = frozen_features(model, dataset, "cpu", rows=rows, progress=False)
    assert not calls  # read back, not encoded again
    torch.testing.assert_close(again["image_features"], first["image_features"])
    assert torch.equal(again["image_mask"], first["image_mask"])
    has = np.array([dataset.catalog.media_path(dataset.image_paths[r]) is not None for r in rows])
    assert first["image_mask"].numpy().tolist() == has.tolist() and 0 < has.sum() < len(rows)
    assert (first["image_features"][~first["image_mask"]] == 0).all()
    assert first["image_features"][first["image_mask"]].abs().sum(1).min() > 0
