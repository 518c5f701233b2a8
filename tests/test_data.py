import pytest
import torch

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


def _part(root, n=None, workers=0, size=32):
    from timm.data import create_transform

    from compressor.data import ImagePart

    s = scan_images(root)
    train = create_transform(size, is_training=True, scale=(0.25, 1.0))
    return ImagePart(s, range(n if n is not None else len(s)), create_transform(size),
                     train, workers=workers)


def test_unreadable_images_are_skipped_and_counted(tmp_path):
    make_images(tmp_path, 4)
    (tmp_path / "n01440764" / "broken.jpg").write_bytes(b"not a jpeg")
    part = _part(tmp_path)
    batches = list(part.batches(2))
    assert sum(len(b) for b in batches) == 4 and len(part) == 5
    assert len(part.skipped) == 1 and "broken.jpg" in next(iter(part.skipped))
    list(part.batches(2))  # a second pass counts the same file once
    assert len(part.skipped) == 1


def test_a_part_with_no_readable_image_is_one_clear_error(tmp_path):
    d = tmp_path / "n01440764"
    d.mkdir()
    for i in range(3):
        (d / f"bad{i}.png").write_bytes(b"")
    with pytest.raises(DataError, match="none of the 3 image files"):
        list(_part(tmp_path).batches(2))


def test_batches_stream_labels_and_positions(tmp_path):
    make_images(tmp_path, 6, wnids=["n01443537", "n15075141"])
    part = _part(tmp_path)
    b = list(part.batches(4))
    assert [len(x) for x in b] == [4, 2] and b[0].x.shape[1:] == (3, 32, 32)
    assert sorted(set(torch.cat([x.y for x in b]).tolist())) == [1, 999]
    assert torch.cat([x.index for x in b]).tolist() == list(range(6))
    sub = part.subset([5, 0])
    assert [int(v) for v in next(iter(sub.batches(2))).index] == [0, 1]
    mem = sub.decode()
    assert torch.equal(mem.x, next(iter(sub.batches(2))).x)


def test_augmented_views_depend_only_on_seed_epoch_and_image(tmp_path):
    make_images(tmp_path, 6)
    order = [[3, 1, 4], [0, 5, 2]]

    def views(workers, epoch=0, seed=0, order=order):
        part = _part(tmp_path, workers=workers)
        return torch.cat([b.x for b in part.batches(order=order, train=True, seed=seed,
                                                   epoch=epoch)])

    torch.manual_seed(123)
    expected_next = torch.rand(1)
    torch.manual_seed(123)
    a = views(0)
    assert torch.equal(torch.rand(1), expected_next)  # the caller's generator did not move
    assert torch.equal(a, views(2))  # in worker processes: the same views
    assert not torch.equal(a, views(0, epoch=1))  # a new epoch: new views
    assert not torch.equal(a, views(0, seed=1))
    # an image's view does not depend on its batch or neighbours
    b = views(0, order=[[1], [3], [4], [0], [5], [2]])
    assert torch.equal(a[1], b[0]) and torch.equal(a[0], b[1])
    plain = torch.cat([x.x for x in _part(tmp_path).batches(order=order)])
    assert not torch.equal(a, plain)  # train=True used the train transform


def test_fingerprint_reads_no_file_and_sees_changes(tmp_path, monkeypatch):
    import os
    from pathlib import Path

    make_images(tmp_path, 4)
    s = scan_images(tmp_path)
    fp = s.fingerprint()

    def no_read(*a, **k):
        raise AssertionError("the fingerprint read a file's bytes")

    monkeypatch.setattr(Path, "read_bytes", no_read)
    monkeypatch.setattr("builtins.open", no_read)
    assert s.fingerprint() == fp
    monkeypatch.undo()
    st = s.paths[0].stat()
    os.utime(s.paths[0], ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert s.fingerprint() != fp
    assert s.fingerprint([1, 2]) != s.fingerprint([1, 3])


def test_split_parts_are_disjoint():
    parts = split_indices(100, 0.6, 0.15, seed=0)
    sets = [set(v) for v in parts.values()]
    assert sum(map(len, sets)) == 100 and len(set().union(*sets)) == 100
    assert len(parts["distill"]) == 60 and len(parts["search"]) == 15
    with pytest.raises(DataError, match="empty"):
        split_indices(2, 0.6, 0.15, seed=0)
