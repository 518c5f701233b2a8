"""The student is a full timm model: timm's data, training, validation and benchmark pieces
take it unchanged."""

import pytest
import timm
import torch
from timm.data import create_dataset, create_loader, resolve_data_config
from timm.optim import create_optimizer_v2
from timm.utils import ModelEmaV3, accuracy

import compressor

from .conftest import make_images


@pytest.fixture(scope="module", params=["test_efficientnet", "test_resnet", "test_vit"])
def pair(request):
    torch.manual_seed(0)
    teacher = timm.create_model(request.param).eval()
    s = compressor.split(teacher)
    choices = ["teacher"] * len(s.layers)
    choices[-1] = "identity" if s.layers[-1].in_shape == s.layers[-1].out_shape else "teacher"
    return teacher, s.assemble(choices).eval()


def test_forward_features_head_and_pre_logits(pair):
    teacher, student = pair
    x = torch.randn(2, *student.pretrained_cfg["input_size"])
    with torch.no_grad():
        feats = student.forward_features(x)
        assert torch.allclose(student.forward_head(feats), student(x), atol=1e-6)
        pre = student.forward_head(feats, pre_logits=True)
        ref = teacher.forward_head(teacher.forward_features(x), pre_logits=True).shape
    assert pre.shape == ref == (2, student.num_features)
    assert student.get_classifier() is student.head.get_submodule(
        teacher.pretrained_cfg["classifier"])


def test_reset_classifier(pair):
    _, student = pair
    import copy

    net = copy.deepcopy(student)
    x = torch.randn(2, *net.pretrained_cfg["input_size"])
    net.reset_classifier(7)
    assert net(x).shape == (2, 7) and net.num_classes == 7
    assert net.pretrained_cfg["num_classes"] == 7
    net.reset_classifier(0)
    assert net(x).shape == (2, net.num_features)
    with pytest.raises(compressor.SplitError, match="global_pool"):
        net.reset_classifier(3, global_pool="max")


def test_feature_info_points_into_the_student(pair):
    teacher, student = pair
    assert len(student.feature_info) == len(teacher.feature_info)
    x = torch.randn(1, *student.pretrained_cfg["input_size"])
    got, want = {}, {}
    hooks = [student.get_submodule(f["module"]).register_forward_hook(
        lambda m, a, out, k=i: got.__setitem__(k, out)) for i, f in
        enumerate(student.feature_info)]
    hooks += [teacher.get_submodule(f["module"]).register_forward_hook(
        lambda m, a, out, k=i: want.__setitem__(k, out)) for i, f in
        enumerate(teacher.feature_info)]
    with torch.no_grad():
        student(x), teacher(x)
    for h in hooks:
        h.remove()
    # every layer but the last is the teacher's: features before it are the teacher's
    for k, f in enumerate(student.feature_info):
        assert got[k].shape[1 if got[k].dim() == 4 else -1] == f["num_chs"]  # maps or tokens
        if f["module"] != f"layers.{len(student.layers) - 1}":
            assert torch.allclose(got[k], want[k], atol=1e-5)


def test_timm_data_train_and_validate_pieces_take_the_student(pair, tmp_path):
    _, student = pair
    import copy

    net = copy.deepcopy(student)
    cfg = resolve_data_config(model=net)
    assert cfg["input_size"] == net.default_cfg["input_size"]
    root = make_images(tmp_path / "imgs", 4, size=40)
    ds = create_dataset("", root=str(root))
    loader = create_loader(ds, input_size=cfg["input_size"], batch_size=2, is_training=True,
                           use_prefetcher=False, num_workers=0)
    opt = create_optimizer_v2(net, opt="adamw", lr=1e-3)
    ema = ModelEmaV3(net, decay=0.9)
    net.train()
    for x, y in loader:
        loss = torch.nn.functional.cross_entropy(net(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        ema.update(net)
    assert torch.isfinite(loss)
    eval_loader = create_loader(ds, input_size=cfg["input_size"], batch_size=2,
                                is_training=False, use_prefetcher=False, num_workers=0,
                                crop_pct=cfg["crop_pct"])
    ema.module.eval()
    with torch.no_grad():
        for x, y in eval_loader:
            (top1,) = accuracy(ema.module(x), y, topk=(1,))
            assert 0 <= float(top1) <= 100
