import pytest

from compressor import DataError
from compressor.data import scan_images, split_indices, wnid_index

from .conftest import make_images


def test_labels_are_imagenet_indices_not_folder_positions(tmp_path):
    # only two classes present: positions would be 0 and 1
    make_images(tmp_path, 4, wnids=["n01443537", "n15075141"])
    s = scan_images(tmp_path)
    assert sorted(set(s.labels)) == [1, 999]
    assert wnid_index()["n01440764"] == 0


def test_flat_folder_is_unlabelled(tmp_path):
    make_images(tmp_path, 3, wnids=None)
    assert scan_images(tmp_path).labels == [None] * 3


def test_missing_and_empty_folders(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        scan_images(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="holds no images"):
        scan_images(tmp_path / "empty")


def test_unreadable_images_are_skipped_and_counted(tmp_path):
    from timm.data import create_transform

    from compressor.data import load_images

    make_images(tmp_path, 4)
    (tmp_path / "n01440764" / "broken.jpg").write_bytes(b"not a jpeg")
    imgs = load_images(scan_images(tmp_path), create_transform(32))
    assert len(imgs) == 4 and len(imgs.skipped) == 1 and "broken.jpg" in imgs.skipped[0]


def test_split_parts_are_disjoint():
    parts = split_indices(100, 0.6, 0.15, seed=0)
    sets = [set(v) for v in parts.values()]
    assert sum(map(len, sets)) == 100 and len(set().union(*sets)) == 100
    assert len(parts["distill"]) == 60 and len(parts["search"]) == 15
    with pytest.raises(DataError, match="empty"):
        split_indices(2, 0.6, 0.15, seed=0)
