from dataclasses import replace

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image
from sklearn.metrics import roc_auc_score

from lsun_hitl import model as model_lib
from lsun_hitl.config import ModelParams


def prep(images, size):
    return np.stack([np.asarray(Image.fromarray(im).convert("RGB").resize((size, size))) for im in images])


@pytest.mark.parametrize("arch", ["mobilenet_v3_small", "small_convnet"])
def test_small_model_learns_a_category_from_scratch(fashion, arch):
    images, classes = fashion
    params = ModelParams(arch=arch, image_size=32, epochs=6, batch_size=64, threads=2)
    x_train, y_train = prep(images[:1500], 32), (classes[:1500] == 7).astype(np.float32)
    x_test, y_test = prep(images[50000:51000], 32), classes[50000:51000] == 7
    net = model_lib.train(x_train, y_train, params, seed=0)
    scores = model_lib.predict(net, x_test)
    assert scores.shape == (1000,) and np.all((scores >= 0) & (scores <= 1))
    assert roc_auc_score(y_test, scores) > 0.95
    # save / load gives the same scores
    again = model_lib.predict(model_lib.load(model_lib.save(net)), x_test)
    np.testing.assert_allclose(scores, again, atol=1e-5)


def test_pretrained_weights_from_a_local_file(tmp_path):
    reference = torchvision.models.mobilenet_v3_small(weights=None)  # ImageNet-shaped: 1000 classes
    path = tmp_path / "mobilenet_v3_small-local.pth"
    torch.save(reference.state_dict(), path)
    net = model_lib.build(ModelParams(arch="mobilenet_v3_small", weights=str(path)))
    first = "features.0.0.weight"
    assert torch.equal(net.net.state_dict()[first], reference.state_dict()[first])
    assert net.net.classifier[-1].out_features == 1  # the head is new


def test_missing_weights_file_names_the_path(tmp_path):
    import pytest

    with pytest.raises(FileNotFoundError, match="nothing-here.pth"):
        model_lib.build(ModelParams(weights=str(tmp_path / "nothing-here.pth")))


def test_frozen_backbone_trains_only_the_head(tmp_path, fashion):
    """A pretrained backbone from a local file with a trained head (linear probe), versus fine-tuning."""
    images, classes = fashion
    source = model_lib.Classifier("mobilenet_v3_small", 32).net  # stands in for a downloaded checkpoint
    for m in source.modules():  # statistics a real checkpoint would bring, which the probe must keep
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
    path = tmp_path / "backbone.pth"
    torch.save(source.state_dict(), path)
    x, y = prep(images[:256], 32), (classes[:256] == 7).astype(np.float32)
    base = dict(arch="mobilenet_v3_small", image_size=32, epochs=1, batch_size=64, weights=str(path))
    probe = model_lib.train(x, y, ModelParams(**base, freeze_backbone=True), seed=0)
    tuned = model_lib.train(x, y, ModelParams(**base), seed=0)
    head = "classifier.3."
    for name, tensor in source.state_dict().items():  # every backbone tensor as loaded, statistics included
        if not name.startswith(head):
            assert torch.equal(probe.net.state_dict()[name], tensor), name
    first = "features.0.0.weight"
    assert not torch.equal(tuned.net.state_dict()[first], source.state_dict()[first])  # fine-tuned
    assert probe.net.state_dict()[head + "weight"].shape == (1, 1024)
    assert probe.net.state_dict()[head + "weight"].abs().sum() > 0
    assert tuned.backbone_id is None and probe.backbone_id == model_lib.load(model_lib.save(probe)).backbone_id


def test_a_frozen_backbone_s_head_is_fit_on_its_features_and_scores_from_them(tmp_path, fashion):
    """The probe learns a category on fixed features, and scores from features equal scores from images."""
    images, classes = fashion
    torch.manual_seed(0)
    source = model_lib.Classifier("small_convnet", 32).net  # random features: enough for trousers
    path = tmp_path / "backbone.pth"
    torch.save(source.state_dict(), path)
    params = ModelParams(arch="small_convnet", image_size=32, weights=str(path), freeze_backbone=True)
    x_train, y_train = prep(images[:1500], 32), (classes[:1500] == 1).astype(np.float32)
    x_test, y_test = prep(images[50000:51000], 32), classes[50000:51000] == 1
    probe = model_lib.train(x_train, y_train, params, seed=0)
    scores = model_lib.predict(probe, x_test)
    assert roc_auc_score(y_test, scores) > 0.95
    for net in (probe, model_lib.for_inference(model_lib.load(model_lib.save(probe)))):
        features = model_lib.embed(net, x_test)
        assert features.shape == (1000, 128) and features.dtype == np.float32
        np.testing.assert_allclose(model_lib.predict_features(net, features), scores, rtol=0, atol=1e-5)
    other = model_lib.train(x_train, (classes[:1500] == 7).astype(np.float32), params, seed=0)
    assert other.backbone_id == probe.backbone_id, "another category, the same backbone: the same features"

    older = tmp_path / "older.pth"  # a checkpoint without the batch norms' step counters (older torchvision)
    torch.save({k: v for k, v in source.state_dict().items() if not k.endswith("num_batches_tracked")}, older)
    frozen_older = model_lib.build(
        ModelParams(arch="small_convnet", image_size=32, weights=str(older), freeze_backbone=True)
    )
    assert frozen_older.backbone_id is not None

    partial = tmp_path / "partial.pth"  # a checkpoint without some backbone tensor cannot be frozen
    torch.save({k: v for k, v in source.state_dict().items() if not k.startswith("0.")}, partial)
    with pytest.raises(ValueError, match=r"partial\.pth.*do not provide.*freeze_backbone=false"):
        model_lib.build(ModelParams(arch="small_convnet", image_size=32, weights=str(partial), freeze_backbone=True))


def test_freezing_without_weights_is_a_config_error():
    import pytest

    from lsun_hitl.config import CascadeParams, ConfigError, validate

    with pytest.raises(ConfigError, match="model.freeze_backbone"):
        validate("sneaker", CascadeParams(model=ModelParams(freeze_backbone=True)))
    schedule = CascadeParams.from_dict({"model_schedule": [{"epochs": 3}, {"arch": "resnet18", "epochs": 5}]})
    assert [schedule.model_for(k).arch for k in (1, 2, 3)] == ["mobilenet_v3_small", "resnet18", "resnet18"]
    with pytest.raises(ConfigError, match=r"model_schedule\[1\].arch"):
        validate("sneaker", CascadeParams.from_dict({"model_schedule": [{}, {"arch": "vgg11"}]}))


def test_weights_on_the_s3_root_are_read_with_its_options_and_checked_before_any_work(s3_bucket):
    import io

    from lsun_hitl.cascade import preflight
    from lsun_hitl.config import CascadeParams
    from lsun_hitl.pretrain import pretrained_weights
    from lsun_hitl.storage import Storage

    url, options = s3_bucket
    storage = Storage(f"{url}/root", options)
    source = model_lib.Classifier("small_convnet", 32)
    buf = io.BytesIO()
    torch.save(source.net.state_dict(), buf)
    storage.write_bytes(storage.path("weights/small.pt"), buf.getvalue())
    params = ModelParams(arch="small_convnet", image_size=32, weights=storage.url_of("weights/small.pt"))
    assert params.weights.startswith("s3://")
    data = pretrained_weights(storage, params)  # the moto endpoint and keys come from the root's options
    assert data == buf.getvalue()
    built = model_lib.build(params, data)
    assert torch.equal(built.net.state_dict()["0.weight"], source.net.state_dict()["0.weight"])
    preflight(storage, "bag", CascadeParams(model=params), need_pool=False)

    # a missing file or one for another architecture is refused before people label anything
    missing = ModelParams(arch="small_convnet", image_size=32, weights=storage.url_of("weights/missing.pt"))
    with pytest.raises(FileNotFoundError, match=r"missing\.pt.* not found"):
        preflight(storage, "bag", CascadeParams(model=missing), need_pool=False)
    other = ModelParams(arch="mobilenet_v3_small", image_size=32, weights=params.weights)
    with pytest.raises(ValueError, match="matches architecture 'mobilenet_v3_small'"):
        preflight(storage, "bag", CascadeParams(model_schedule=(params, other)), need_pool=False)


def test_folded_batch_norm_scores_as_the_model_does():
    torch.manual_seed(0)
    x = np.random.default_rng(0).integers(0, 255, (64, 32, 32, 3), dtype=np.uint8)
    for arch in ("small_convnet", "mobilenet_v3_small", "resnet18"):
        net = model_lib.build(ModelParams(arch=arch, image_size=32))
        for m in net.modules():  # statistics other than the initial ones, so folding has something to fold
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
        net.eval()
        folded = model_lib.for_inference(model_lib.load(model_lib.save(net)))
        assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules()), arch
        np.testing.assert_allclose(model_lib.predict(folded, x), model_lib.predict(net, x), atol=1e-5, err_msg=arch)


def test_min_steps_gives_few_labels_more_passes_and_max_steps_still_caps():
    from lsun_hitl.model import schedule

    p = ModelParams(batch_size=128, epochs=10, max_steps=4000)
    assert schedule(300, p) == (10, 30)  # ten passes over 300 labels: 30 steps
    assert schedule(300, replace(p, min_steps=400)) == (134, 402)  # whole passes up to at least 400 steps
    assert schedule(60_000, replace(p, min_steps=400)) == (8, 3752)  # many labels: max_steps binds as before
