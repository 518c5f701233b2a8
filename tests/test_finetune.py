"""The finetune: consistent teaching on augmented views, resume at the epoch, EMA or raw weights
chosen on the search part."""

import copy

import pytest
import timm
import torch
from timm.data import create_transform

import compressor
from compressor import finetune as finetune_mod
from compressor.data import ImagePart, scan_images
from compressor.finetune import finetune
from compressor.recipe import FinetuneCfg

from .conftest import make_images


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    torch.manual_seed(0)
    teacher = timm.create_model("test_efficientnet").eval()
    s = compressor.split(teacher, input_size=(3, 48, 48))
    choices = ["teacher"] * len(s.layers)
    choices[1] = "identity" if s.layers[1].in_shape == s.layers[1].out_shape else "teacher"
    root = make_images(tmp_path_factory.mktemp("ft") / "imgs", 16, size=56)
    images = scan_images(root)
    part = ImagePart(images, range(12), create_transform(48),
                     create_transform(48, is_training=True, scale=(0.25, 1.0)))
    val = ImagePart(images, range(12, 16), create_transform(48))
    return teacher, s, choices, part, val


CFG = FinetuneCfg(epochs=2, batch_size=4, opt="adamw", lr=1e-3, mixup=0.2, ema_decay=0.9)


def test_the_teacher_sees_the_same_augmented_view(setup):
    teacher, s, choices, part, val = setup
    student = s.assemble(choices)
    seen = {"t": [], "s": []}
    t_hook = teacher.register_forward_pre_hook(lambda m, a: seen["t"].append(a[0].clone()))
    s_hook = student.register_forward_pre_hook(lambda m, a: seen["s"].append(a[0].clone()))
    rng = torch.random.get_rng_state()
    try:
        rec = finetune(student, teacher, part, CFG, progress=False)
    finally:
        t_hook.remove()
        s_hook.remove()
    assert torch.equal(torch.random.get_rng_state(), rng)  # the caller's stream is as it was
    assert rec["steps"] == 6 and len(seen["s"]) == len(seen["t"]) == 6
    for a, b in zip(seen["s"], seen["t"]):
        assert torch.equal(a, b)
    plain = torch.cat([b.x for b in part.batches(4)])
    assert not any(torch.equal(x, plain[:4]) for x in seen["s"])  # augmented (and mixed)


def test_an_interrupted_finetune_resumes_at_its_epoch_with_the_same_result(setup, tmp_path,
                                                                           monkeypatch):
    teacher, s, choices, part, val = setup
    whole = s.assemble(choices)
    ref = finetune(whole, teacher, part, CFG, progress=False, val=val,
                   checkpoint=tmp_path / "a.ckpt")
    assert [h["epoch"] for h in ref["history"]] == [1, 2]
    # kept: the epoch and weights (raw or EMA) with the lowest search-part loss
    losses = {(h["epoch"], w): h["search_loss" if w == "raw" else "search_loss_ema"]
              for h in ref["history"] for w in ("raw", "ema")}
    losses[(0, "start")] = ref["start_search_loss"]  # the untrained weights compete too
    assert (ref["kept_epoch"], ref["kept"]) == min(losses, key=losses.get)

    save = finetune_mod._save

    def save_then_stop(path, epoch, *args):
        save(path, epoch, *args)
        raise KeyboardInterrupt  # killed right after the first epoch's checkpoint

    monkeypatch.setattr(finetune_mod, "_save", save_then_stop)
    cut = s.assemble(choices)
    with pytest.raises(KeyboardInterrupt):
        finetune(cut, teacher, part, CFG, progress=False, val=val,
                 checkpoint=tmp_path / "b.ckpt")
    monkeypatch.setattr(finetune_mod, "_save", save)
    resumed = s.assemble(choices)
    rec = finetune(resumed, teacher, part, CFG, progress=False, val=val,
                   checkpoint=tmp_path / "b.ckpt")
    assert rec["resumed_from_epoch"] == 1 and rec["history"] == ref["history"]
    assert rec["start_search_loss"] == ref["start_search_loss"]
    for (k, a), b in zip(whole.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), k


def test_a_damaged_checkpoint_is_one_clear_error(setup, tmp_path):
    teacher, s, choices, part, _ = setup
    bad = tmp_path / "c.ckpt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(compressor.ArtifactError, match="delete it"):
        finetune(s.assemble(choices), teacher, part, CFG, progress=False, checkpoint=bad)


def test_no_epochs_leaves_the_student_alone(setup):
    teacher, s, choices, part, _ = setup
    student = s.assemble(choices)
    before = copy.deepcopy(student.state_dict())
    rec = finetune(student, teacher, part, FinetuneCfg(epochs=0), progress=False)
    assert rec["steps"] == 0
    assert all(torch.equal(before[k], v) for k, v in student.state_dict().items())


def test_patience_stops_and_the_best_epoch_is_kept(setup, monkeypatch, tmp_path):
    """Search-part losses that only rise after epoch 1: patience 1 stops after epoch 2 and the
    student ends with epoch 1's weights (the EMA ones here, given a lower loss)."""
    teacher, s, choices, part, val = setup
    losses = iter([3.0, 1.0, 0.9, 1.5, 1.6, 2.0, 2.1])  # before training, then raw, EMA
    monkeypatch.setattr(finetune_mod, "_val_loss", lambda *a: next(losses))
    kept = {}
    real_save = finetune_mod._save

    def save(path, epoch, net, optimizer, ema, scaler, rec, best):
        if epoch == 1:
            kept.update({k: v.clone() for k, v in ema.module.state_dict().items()})
        real_save(path, epoch, net, optimizer, ema, scaler, rec, best)

    monkeypatch.setattr(finetune_mod, "_save", save)
    student = s.assemble(choices)
    cfg = FinetuneCfg(epochs=4, batch_size=4, opt="adamw", lr=1e-3, ema_decay=0.9, patience=1)
    rec = finetune(student, teacher, part, cfg, progress=False, val=val,
                   checkpoint=tmp_path / "p.ckpt")
    assert rec["stopped_early_after_epoch"] == 2 and len(rec["history"]) == 2
    assert (rec["kept"], rec["kept_epoch"]) == ("ema", 1)
    assert all(torch.equal(kept[k], v) for k, v in student.state_dict().items())


@pytest.mark.parametrize("order,kept", [([0.5, 0.7, 0.9, 0.8, 1.0, 1.1], "start"),
                                        ([0.9, 0.5, 0.7, 0.8, 1.0, 1.1], "features")])
def test_a_finetune_that_only_moves_away_from_the_teacher_keeps_the_weights_it_began_with(
        setup, monkeypatch, order, kept):
    """Search-part losses lowest before training, or after the feature stage: the student ends
    with the weights it had at that point (epoch 0), not any epoch's."""
    teacher, s, choices, part, val = setup
    features = s.assemble(["teacher"] * len(s.layers)).eval()
    cfg = FinetuneCfg(epochs=2, batch_size=4, opt="adamw", lr=1e-2, ema_decay=0.9,
                      feature_epochs=1)
    losses = iter(order)  # before training, after the feature stage, then raw, EMA per epoch
    monkeypatch.setattr(finetune_mod, "_val_loss", lambda *a: next(losses))
    after_features = {}
    real = finetune_mod._feature_stage

    def stage(net, *a, **k):
        out = real(net, *a, **k)
        after_features.update({n: v.clone() for n, v in net.state_dict().items()})
        return out

    monkeypatch.setattr(finetune_mod, "_feature_stage", stage)
    student = s.assemble(choices)
    before = copy.deepcopy(student.state_dict())
    rec = finetune(student, teacher, part, cfg, progress=False, val=val,
                   teacher_features=features)
    assert (rec["kept"], rec["kept_epoch"]) == (kept, 0) and len(rec["history"]) == 2
    assert rec["start_search_loss"] == order[0]
    assert rec["feature_stage"]["search_loss"] == order[1]
    assert any(not torch.equal(before[k], v) for k, v in after_features.items())
    want = before if kept == "start" else after_features
    assert all(torch.equal(want[k], v) for k, v in student.state_dict().items())


def test_keep_start_false_keeps_an_epochs_weights_however_the_start_scored(setup, monkeypatch):
    teacher, s, choices, part, val = setup
    losses = iter([1.0, 0.9, 0.8, 0.95])  # raw, EMA per epoch: never asked before training
    monkeypatch.setattr(finetune_mod, "_val_loss", lambda *a: next(losses))
    cfg = FinetuneCfg(epochs=2, batch_size=4, opt="adamw", lr=1e-3, ema_decay=0.9,
                      keep_start=False)
    rec = finetune(s.assemble(choices), teacher, part, cfg, progress=False, val=val)
    assert rec["start_search_loss"] is None
    assert (rec["kept"], rec["kept_epoch"]) == ("raw", 2)


def _calibrated(teacher, part):
    """A copy of `teacher` with the norm statistics of these images, as a trained one has (the
    feature stage trains in train mode, on batch statistics)."""
    teacher = copy.deepcopy(teacher)
    for m in teacher.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = None
    with torch.no_grad():
        teacher.train()(torch.cat([b.x for b in part.batches(12)]))
    return teacher.eval()


def test_the_feature_stage_trains_the_body_towards_the_teachers_features(setup):
    teacher, s, choices, part, val = setup
    teacher = _calibrated(teacher, part)
    s = compressor.split(teacher, input_size=(3, 48, 48))
    student = s.assemble(["teacher"] * len(s.layers))
    with torch.no_grad():  # the last layer knocked off the teacher's function
        for p in student.layers[-1].parameters():
            p.add_(0.3 * p.abs().mean() * torch.randn(p.shape, generator=torch.Generator()
                                                      .manual_seed(p.numel())))
    features = s.assemble(["teacher"] * len(s.layers)).eval()
    head = copy.deepcopy(student.head.state_dict())
    x = torch.cat([b.x for b in val.batches(4)])

    def gap() -> float:
        with torch.no_grad():
            t = features.forward_features(x)
            return float((student.eval().forward_features(x) - t).pow(2).mean() / t.pow(2).mean())

    before = gap()
    cfg = FinetuneCfg(epochs=0, batch_size=4, opt="adamw", lr=1e-3, feature_epochs=3)
    with pytest.raises(ValueError, match="teacher_features"):
        finetune(s.assemble(["teacher"] * len(s.layers)), teacher, part, cfg, progress=False)
    rec = finetune(student, teacher, part, cfg, progress=False, teacher_features=features)
    assert rec["feature_stage"]["epochs"] == 3 and len(rec["feature_stage"]["train_loss"]) == 3
    assert all(torch.equal(head[k], v) for k, v in student.head.state_dict().items())
    assert gap() < before


def test_the_feature_stage_can_match_every_layer_from_the_first_replaced_one(setup):
    teacher, s, choices, part, val = setup
    teacher = _calibrated(teacher, part)
    s = compressor.split(teacher, input_size=(3, 48, 48))
    features = s.assemble(["teacher"] * len(s.layers)).eval()
    student = s.assemble(choices)
    first = choices.index("identity") if "identity" in choices else 0
    x = torch.cat([b.x for b in val.batches(4)])
    with torch.no_grad():
        outs = finetune_mod._features(features, x, first)
        assert len(outs) == len(s.layers) - first
        torch.testing.assert_close(outs[-1], features.forward_features(x))
    # a layer after the first replaced one, knocked off the teacher's function
    k = len(s.layers) - 2
    with torch.no_grad():
        for p in student.layers[k].parameters():
            p.add_(0.3 * p.abs().mean() * torch.randn(p.shape, generator=torch.Generator()
                                                      .manual_seed(p.numel())))

    def gap() -> float:  # at that layer's own output, which `last` would not target
        with torch.no_grad():
            t = finetune_mod._features(features, x, k)[0]
            o = finetune_mod._features(student.eval(), x, k)[0]
            return float((o - t).pow(2).mean() / t.pow(2).mean())

    before = gap()
    cfg = FinetuneCfg(epochs=0, batch_size=4, opt="adamw", lr=1e-3, feature_epochs=3,
                      feature_match="layers")
    with pytest.raises(ValueError, match="same layers"):
        finetune(s.assemble(choices), teacher, part, cfg, progress=False,
                 teacher_features=teacher)  # timm's model: no stem / layers
    rec = finetune(student, teacher, part, cfg, progress=False, teacher_features=features)
    assert len(rec["feature_stage"]["train_loss"]) == 3
    assert gap() < before


def test_feature_match_is_checked_in_recipes():
    from compressor._errors import RecipeError
    from compressor.recipe import Recipe, validate

    with pytest.raises(RecipeError, match="feature_match"):
        validate(Recipe().override("finetune", feature_match="every"), "t")


def test_freeze_bn_keeps_every_batchnorm_statistic_while_the_weights_train(setup):
    """With `freeze_bn`, the feature stage and the epochs train the weights (BatchNorm affine
    parameters included) and leave every running statistic as it was; without it they move."""
    teacher, s, choices, part, val = setup
    features = s.assemble(["teacher"] * len(s.layers)).eval()
    for freeze in (True, False):
        student = s.assemble(choices)
        before = copy.deepcopy(student.state_dict())
        cfg = FinetuneCfg(epochs=1, batch_size=4, opt="adamw", lr=1e-3, ema_decay=0,
                          feature_epochs=1, keep_start=False, freeze_bn=freeze)
        finetune(student, teacher, part, cfg, progress=False, teacher_features=features)
        after = student.state_dict()
        stats = [k for k in before if k.endswith(("running_mean", "running_var"))]
        affine = [k for k in before if k.rpartition(".")[0] + ".running_mean" in before
                  and k.endswith("weight")]
        assert stats and affine
        assert all(torch.equal(before[k], after[k]) for k in stats) == freeze
        assert any(not torch.equal(before[k], after[k]) for k in affine)


def test_freeze_bn_is_checked_in_recipes():
    from compressor._errors import RecipeError
    from compressor.recipe import Recipe, validate

    with pytest.raises(RecipeError, match="freeze_bn"):
        validate(Recipe().override("finetune", freeze_bn="yes"), "t")
