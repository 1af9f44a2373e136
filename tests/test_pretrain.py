"""Self-supervised pretraining on the pool: it learns from unlabeled images, is stored once, and the cascade's
models start from it with ``weights="pool"``."""

import io
import os

import numpy as np
import pytest
import torch

from cli import main as cli
from lsun_hitl import cascade
from lsun_hitl import model as model_lib
from lsun_hitl.config import CascadeParams, ModelParams
from lsun_hitl.crowd import CrowdParams, SimulatedCrowd, deliver
from lsun_hitl.fashion_mnist import import_fashion_mnist
from lsun_hitl.ingest import build_pool
from lsun_hitl.pretrain import ROTATIONS, pool_weights, pretrain_on_pool, rotate, rotation_pretrain
from lsun_hitl.storage import Storage, pretrained_key
from lsun_hitl.truth import read_truth
from tests.test_model import prep


def rotation_accuracy(state: dict, images: np.ndarray) -> float:
    """Share of ``images``, each turned by a known multiple of 90 degrees, whose turn the network names."""
    net = model_lib.Classifier("small_convnet", 32)
    model_lib.replace_head(net.net, ROTATIONS)
    net.net.load_state_dict(state)
    net.eval()
    turns = torch.arange(len(images)) % ROTATIONS
    x = rotate(torch.from_numpy(images).float(), turns)
    with torch.no_grad():
        guess = net.net((x.permute(0, 3, 1, 2) - net.mean) / net.std).argmax(1)
    return float((guess == turns).float().mean())


def test_rotation_pretraining_learns_from_unlabeled_images(fashion):
    images, _ = fashion  # labels are not used
    params = ModelParams(arch="small_convnet", image_size=32, threads=2)
    weights, info = rotation_pretrain(prep(images[:2000], 32), params, epochs=2, batch_size=128, seed=0)
    state = torch.load(io.BytesIO(weights), weights_only=True)
    held_out = rotation_accuracy(state, prep(images[50000:50800], 32))
    assert held_out > 0.6, held_out  # chance is 0.25
    assert info.images == 2000 and info.epochs == 2 and info.accuracy > 0.5
    # a classifier starts from every tensor but the four-way head
    net = model_lib.Classifier("small_convnet", 32)
    loaded = model_lib.load_pretrained(net, weights)
    head = model_lib.head_name(net.net)
    assert loaded == {k for k in state if not k.startswith(head + ".")} and len(loaded) > 20
    assert torch.equal(net.net.state_dict()["0.weight"], state["0.weight"])
    assert net.net.get_submodule(head).out_features == 1


def test_rotate_turns_each_image_its_own_number_of_quarter_turns():
    img = torch.arange(16, dtype=torch.float32).view(1, 4, 4, 1).expand(4, 4, 4, 3).clone()
    out = rotate(img, torch.tensor([0, 1, 2, 3]))
    for k in range(4):
        assert torch.equal(out[k], torch.rot90(img[k], k, dims=(0, 1)))


def test_rotation_pretrain_refuses_images_that_are_not_square():
    with pytest.raises(ValueError, match="square RGB"):
        rotation_pretrain(np.zeros((4, 32, 24, 3), np.uint8), ModelParams(arch="small_convnet", image_size=32))


def test_pool_backbone_is_stored_once_and_the_cascade_trains_from_it(tmp_path, dask_cluster, capsys):
    storage = Storage(str(tmp_path / "root"))
    build_pool(storage, import_fashion_mnist(storage, limit=400, seed=5), client=dask_cluster)
    model = ModelParams(arch="small_convnet", image_size=32, epochs=1, batch_size=64, weights="pool")
    params = CascadeParams(
        train_sample=100,
        calibration_sample=100,
        first_calibration_sample=100,
        target_false_omission=0.05,
        max_iterations=2,
        large_remainder="people",  # the remainder goes to people without asking an operator
        allow_small_pool=True,
        model=model,
    )
    with pytest.raises(FileNotFoundError, match="lsun-hitl pretrain --root"):
        pool_weights(storage, model)

    assert (
        cli(
            [
                "pretrain",
                "--root",
                storage.url,
                "--arch",
                "small_convnet",
                "--image-size",
                "32",
                "--sample",
                "300",
                "--epochs",
                "1",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    path = storage.path(pretrained_key("small_convnet", 32))
    assert "on 300 pool images" in out and path in out and "--weights pool" in out
    stamp = os.stat(path).st_mtime_ns
    assert cascade.pretrain(storage, params) == [path]  # stored: not trained again
    assert pretrain_on_pool(storage, model, epochs=3) == path and os.stat(path).st_mtime_ns == stamp

    cascade.start(storage, "bag", params)
    request = cascade.publish_iteration(storage, "bag", params, 1)
    assert deliver(storage, "bag", SimulatedCrowd(read_truth(storage, "bag"), CrowdParams(seed=1)), request.request_id)
    cascade.train(storage, "bag", params, 1)
    trained = model_lib.load(storage.read_bytes(cascade.model_key_path(storage, "bag", 1)))
    start = torch.load(path, weights_only=True)
    # one pass of fine-tuning moves the first convolution only a little from the pool backbone
    gap = (trained.net.state_dict()["0.weight"] - start["0.weight"]).abs().mean()
    scratch = model_lib.Classifier("small_convnet", 32).net.state_dict()["0.weight"]
    assert gap < (scratch - start["0.weight"]).abs().mean() / 4


def test_frozen_pool_backbone_every_category_scores_from_the_features_the_first_one_stored(tmp_path, dask_cluster):
    """Two category runs on one pool with ``--weights pool --freeze-backbone``: each iteration fits a head only;
    the first scoring pass decodes the pool and stores its features, the other category's reads them."""
    storage = Storage(str(tmp_path / "root"))
    build_pool(storage, import_fashion_mnist(storage, limit=400, seed=6), client=dask_cluster)
    model = ModelParams(arch="small_convnet", image_size=32, weights="pool", freeze_backbone=True)
    params = CascadeParams(
        train_sample=100,
        calibration_sample=100,
        first_calibration_sample=100,
        target_false_omission=0.05,
        max_iterations=2,
        large_remainder="people",
        allow_small_pool=True,
        model=model,
    )
    backbone = cascade.pretrain(storage, params)[0]
    stats = {}
    for category in ("bag", "trouser"):
        cascade.start(storage, category, params)
        request = cascade.publish_iteration(storage, category, params, 1)
        crowd = SimulatedCrowd(read_truth(storage, category), CrowdParams(seed=1))
        assert deliver(storage, category, crowd, request.request_id)
        cascade.train(storage, category, params, 1)
        assert cascade.score(storage, category, params, 1) == 400 - 100  # all but the training images
        stats[category] = storage.read_json(storage.path("scores", category, "iteration=1", "stats.json"))
    assert stats["bag"]["decoded"] == 400 and stats["bag"]["from_features"] == 0
    assert stats["trouser"]["decoded"] == 0 and stats["trouser"]["from_features"] == 300

    nets = {c: model_lib.load(storage.read_bytes(cascade.model_key_path(storage, c, 1))) for c in ("bag", "trouser")}
    start = torch.load(backbone, weights_only=True)
    for c, net in nets.items():  # the backbone is the pool's, untouched; only the heads differ
        assert torch.equal(net.net.state_dict()["0.weight"], start["0.weight"]), c
        assert torch.equal(net.net.state_dict()["1.running_mean"], start["1.running_mean"]), c
    assert nets["bag"].backbone_id == nets["trouser"].backbone_id
    assert not torch.equal(nets["bag"].net[-1].weight, nets["trouser"].net[-1].weight)
    # the trouser head, scored from features another category's pass stored, still finds trousers
    import pyarrow as pa

    from lsun_hitl.cascade.score import score_parts
    from lsun_hitl.ingest import read_pool

    paths, _ = score_parts(storage, "trouser", 1)
    scored = pa.concat_tables([storage.read_table(p) for p in paths]).to_pydict()
    pool = read_pool(storage, columns=["image_id", "uri"]).to_pydict()
    uri = dict(zip(pool["image_id"], pool["uri"], strict=True))
    truth = read_truth(storage, "trouser")
    is_trouser = np.array([truth[uri[i]] for i in scored["image_id"]])
    score = np.array(scored["score"], np.float32)
    assert is_trouser.any() and score[is_trouser].mean() > score[~is_trouser].mean() + 0.3
