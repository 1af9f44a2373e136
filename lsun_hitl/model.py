"""The classifier: a torchvision architecture (or ``small_convnet``, for small images) with a one-logit
head, trained on human labels.

Training and scoring run on CUDA with bfloat16 autocast when a GPU is present (``device()``), on the
CPU otherwise.

Inputs are uint8 images ``(N, H, W, 3)``; normalisation (ImageNet mean/std) lives inside the model,
so a saved model scores raw decoded images. Pretrained weights come from a local file (for example
torchvision's ``~/.cache/torch/hub/checkpoints/mobilenet_v3_small-047dcff4.pth``): every tensor
whose name and shape match is loaded, except the last linear layer (the head), which is trained from
scratch. With ``freeze_backbone`` the backbone stays exactly as loaded (batch-norm statistics included) and
only the head is fit, on the backbone's features (``train_head``): a linear probe. Such a model carries its
backbone's id (``backbone_id``), so scoring can keep each pool image's features and a later model on the
same backbone, of any category, scores from them without reading an image (``lsun_hitl.features``).
"""

from __future__ import annotations

import hashlib
import io
import math
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
import torchvision
from torch import nn

from .config import ModelParams
from .images import DEFAULT_MAX_PIXELS, ImageError, load_for_model
from .progress import Progress
from .steps import count_decoded

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


def small_convnet(num_classes: int = 1) -> nn.Sequential:
    """A plain five-layer convolutional network for small images (Fashion-MNIST, thumbnails).

    Three stages of 3x3 convolutions with batch norm (32, 64, 128 channels), each halving the
    resolution, then global average pooling and a linear head: ~0.14 M parameters, ~30 MFLOPs at 32 px.
    It keeps full resolution in its first stage, where torchvision's ImageNet networks (a stride-2 stem,
    built for 224 px) throw three quarters of a 28-px image away.
    """

    def block(cin: int, cout: int, convs: int) -> list[nn.Module]:
        layers: list[nn.Module] = []
        for i in range(convs):
            layers += [nn.Conv2d(cin if i == 0 else cout, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout)]
            layers.append(nn.ReLU(inplace=True))
        return [*layers, nn.MaxPool2d(2)]

    return nn.Sequential(
        *block(3, 32, 2),
        *block(32, 64, 2),
        *block(64, 128, 1),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Dropout(0.2),
        nn.Linear(128, num_classes),
    )


LOCAL_ARCHITECTURES = {"small_convnet": small_convnet}  # beside torchvision's, by name


class Classifier(nn.Module):
    """uint8 NHWC images in, one logit per image out."""

    def __init__(self, arch: str, image_size: int) -> None:
        super().__init__()
        self.arch, self.image_size = arch, image_size
        self.backbone_id: str | None = None  # set on frozen-backbone models: the features' cache key
        if arch in LOCAL_ARCHITECTURES:
            self.net = LOCAL_ARCHITECTURES[arch](num_classes=1)
        else:
            self.net = getattr(torchvision.models, arch)(weights=None, num_classes=1)
        self.register_buffer("mean", torch.tensor(MEAN).view(1, 3, 1, 1) * 255)
        self.register_buffer("std", torch.tensor(STD).view(1, 3, 1, 1) * 255)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.permute(0, 3, 1, 2).float()
        x = (x - self.mean) / self.std
        return self.net(x).squeeze(1)


def device() -> torch.device:
    """CUDA when a GPU is present (``LSUN_HITL_DEVICE`` overrides: ``cpu``, ``cuda``, ``cuda:1``), else the CPU."""
    import os

    name = os.environ.get("LSUN_HITL_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def autocast(dev: torch.device) -> torch.autocast:
    """Mixed precision (bfloat16) on CUDA; a no-op on the CPU."""
    return torch.autocast(device_type=dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda")


def build(params: ModelParams, pretrained: bytes | None = None) -> Classifier:
    """A new classifier; with ``pretrained`` (a state dict's bytes) or else ``params.weights`` (a file) its
    backbone starts from them. With ``params.freeze_backbone`` they must provide every tensor but the head's
    (the backbone is then a fixed function, named by ``backbone_id``)."""
    model = Classifier(params.arch, params.image_size)
    source = pretrained if pretrained is not None else params.weights
    if source:
        loaded = load_pretrained(model, source)
        if params.freeze_backbone:
            head = head_name(model.net)
            missing = sorted(
                k
                for k in model.net.state_dict()
                if k not in loaded and not k.startswith(head + ".") and not k.endswith("num_batches_tracked")
            )  # older checkpoints lack the batch norms' step counters, which eval mode never reads
            if missing:
                raise ValueError(
                    f"weights {source if isinstance(source, str) else '<bytes>'!r} do not provide {len(missing)} "
                    f"tensors of {params.arch!r} (first: {missing[0]!r}); a frozen backbone needs every tensor but "
                    "the head: pass a full checkpoint, or set freeze_backbone=false to train what is missing"
                )
            model.backbone_id = backbone_id(model)
    return model


def backbone_id(model: Classifier) -> str:
    """16 hex digits of BLAKE2b over the architecture, input size and every tensor but the head's (names and
    bytes): two models with the same id compute the same features for any image."""
    head = head_name(model.net) + "."
    digest = hashlib.blake2b(f"{model.arch}/{model.image_size}".encode(), digest_size=8)
    for name, tensor in sorted(model.net.state_dict().items()):
        if not name.startswith(head):
            digest.update(name.encode())
            digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def read_weights(source: str, **storage_options: object) -> bytes:
    """The bytes of a weights file at ``source`` (a path or any fsspec URL, opened with ``storage_options``).

    Raises FileNotFoundError naming the file and what to pass instead.
    """
    import fsspec

    try:
        with fsspec.open(source, "rb", **storage_options) as f:
            return f.read()
    except FileNotFoundError as exc:
        hint = " (the pool's own backbone: run `lsun-hitl pretrain --root <root>` first)" if source == "pool" else ""
        raise FileNotFoundError(
            f"pretrained weights {source!r} not found{hint}; pass a state-dict file (local, e.g. from "
            "~/.cache/torch/hub/checkpoints, or a URL on the storage root) or leave model.weights unset"
        ) from exc


def load_pretrained(model: Classifier, source: str | bytes) -> set[str]:
    """Load matching tensors from a torchvision state dict (a file path, or its bytes); return the names loaded."""
    path = "<bytes>" if isinstance(source, bytes) else source
    data = source if isinstance(source, bytes) else read_weights(source)
    state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    own = model.net.state_dict()
    head = head_name(model.net)
    usable = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape and not k.startswith(head + ".")}
    if not usable:
        raise ValueError(f"no tensor in {path!r} matches architecture {model.arch!r}; check model.arch")
    model.net.load_state_dict(usable, strict=False)
    return set(usable)


def head_name(net: nn.Module) -> str:
    """Name of the network's last linear layer: the one-logit head, always trained from scratch."""
    return [name for name, m in net.named_modules() if isinstance(m, nn.Linear)][-1]


def replace_head(net: nn.Module, outputs: int) -> None:
    """Swap the network's last linear layer for a new one with ``outputs`` outputs (same inputs)."""
    name = head_name(net)
    parent, _, leaf = name.rpartition(".")
    owner = net.get_submodule(parent) if parent else net
    setattr(owner, leaf, nn.Linear(getattr(owner, leaf).in_features, outputs))  # Sequential children too


def save(model: Classifier) -> bytes:
    buf = io.BytesIO()
    blob = {"arch": model.arch, "image_size": model.image_size, "state_dict": model.state_dict()}
    if model.backbone_id:
        blob["backbone_id"] = model.backbone_id
    torch.save(blob, buf)
    return buf.getvalue()


def load(data: bytes) -> Classifier:
    blob = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    model = Classifier(blob["arch"], blob["image_size"])
    model.load_state_dict(blob["state_dict"])
    model.backbone_id = blob.get("backbone_id")
    return model.eval()


def for_inference(model: Classifier) -> Classifier:
    """``model`` with each batch norm folded into the convolution before it (scoring only: it cannot train).

    At inference a batch norm is a fixed affine map, so folding it into the convolution's weights gives the
    same scores (to float rounding) for one layer less; torch.fx finds the pairs in any traceable network
    (torchvision's and ``small_convnet``). A network it cannot trace is returned unchanged.
    """
    from torch.fx.experimental.optimization import fuse

    try:
        model.net = fuse(model.net.eval())
    except Exception:  # noqa: BLE001 - tracing fails in many ways on exotic networks; scoring still works
        pass
    return model


def decode_each(
    blobs: Sequence[bytes], size: int, threads: int = 4, max_pixels: int = DEFAULT_MAX_PIXELS
) -> tuple[np.ndarray, list[str | None]]:
    """Decode image bytes in threads: ``(images (N, size, size, 3) uint8, errors)``, where an image that is not
    usable is zeros and its error the reason (``images.ImageError``'s sentence), else None. ``max_pixels`` is the
    pool's pixel limit (``IngestParams.max_image_pixels``), applied in this process."""

    def one(data: bytes) -> np.ndarray | str:
        try:
            return load_for_model(data, size, max_pixels)
        except ImageError as exc:
            return str(exc)

    with ThreadPoolExecutor(max_workers=threads) as pool:
        decoded = list(pool.map(one, blobs))
    count_decoded(len(blobs))
    out = np.zeros((len(blobs), size, size, 3), np.uint8)
    errors: list[str | None] = []
    for i, d in enumerate(decoded):
        if isinstance(d, str):
            errors.append(d)
        else:
            out[i] = d
            errors.append(None)
    return out, errors


def decode_many(
    blobs: Sequence[bytes], size: int, threads: int = 4, max_pixels: int = DEFAULT_MAX_PIXELS
) -> tuple[np.ndarray, np.ndarray]:
    """Decode image bytes in threads; return ``(images (N, size, size, 3) uint8, ok mask (N,))`` (``decode_each``
    without the reasons)."""
    out, errors = decode_each(blobs, size, threads, max_pixels)
    return out, np.array([e is None for e in errors], bool)


def augment(batch: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random horizontal flip and a random crop from a 4-pixel reflection pad (uint8 NHWC)."""
    n, h, w, _ = batch.shape
    flip = torch.rand(n, generator=generator) < 0.5
    batch = torch.where(flip.view(n, 1, 1, 1), batch.flip(2), batch)
    pad = max(2, h // 16)
    padded = nn.functional.pad(batch.permute(0, 3, 1, 2).float(), (pad, pad, pad, pad), mode="reflect")
    dx, dy = torch.randint(0, 2 * pad + 1, (2,), generator=generator).tolist()
    return padded[:, :, dy : dy + h, dx : dx + w].permute(0, 2, 3, 1)


def schedule(n_images: int, params: ModelParams) -> tuple[int, int]:
    """``(epochs, steps)`` training runs on ``n_images``: ``params.epochs`` passes, more when they would be fewer
    than ``params.min_steps``, fewer when they would exceed ``params.max_steps`` (one at least)."""
    steps_per_epoch = max(1, math.ceil(n_images / params.batch_size))
    epochs = max(params.epochs, math.ceil(params.min_steps / steps_per_epoch))
    epochs = max(1, min(epochs, params.max_steps // steps_per_epoch))
    return epochs, steps_per_epoch * epochs


def train(
    images: np.ndarray,
    targets: np.ndarray,
    params: ModelParams,
    *,
    seed: int = 0,
    progress: Progress | None = None,
    pretrained: bytes | None = None,
) -> Classifier:
    """Train a classifier on ``images`` (N, H, W, 3) uint8 and ``targets`` (N,) in [0, 1].

        Targets may be soft (the aggregated human posterior), so label noise the crowd model knows of
        is not learned as certainty. AdamW with a one-cycle schedule, ``params.epochs`` passes (fewer when
    they would exceed ``params.max_steps``). ``pretrained`` (a state dict's bytes) overrides
    ``params.weights`` as the backbone's start. With ``params.freeze_backbone`` only the head is fit
    (``train_head``).
    """
    if len(images) != len(targets) or len(images) == 0:
        raise ValueError(f"need equally many images and targets, got {len(images)} and {len(targets)}")
    if params.freeze_backbone:
        return train_head(images, targets, params, seed=seed, progress=progress, pretrained=pretrained)
    torch.manual_seed(seed)
    torch.set_num_threads(max(1, params.threads))
    generator = torch.Generator().manual_seed(seed)
    dev = device()
    model = build(params, pretrained).to(dev).train()
    x = torch.from_numpy(images)
    y = torch.from_numpy(np.asarray(targets, np.float32))
    epochs, total = schedule(len(x), params)
    trainable = [t for t in model.parameters() if t.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=params.learning_rate, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=params.learning_rate, total_steps=total, pct_start=0.15)
    loss_fn = nn.BCEWithLogitsLoss()
    step = 0
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=generator)
        for start in range(0, len(x), params.batch_size):
            idx = order[start : start + params.batch_size]
            if len(idx) < 2:  # batch norm needs two samples
                continue
            with autocast(dev):
                logits = model(augment(x[idx], generator).to(dev, non_blocking=True))
            loss = loss_fn(logits.float(), y[idx].to(dev))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            step += 1
            if progress:
                progress(step, total)
    refresh_batchnorm(model, x, params.batch_size)
    return model.cpu().eval()  # saved and shipped on the CPU; scoring moves it to its own device


@torch.no_grad()
def refresh_batchnorm(model: nn.Module, images: torch.Tensor, batch_size: int) -> None:
    """Recompute batch-norm running statistics as exact averages over ``images``.

    torchvision's MobileNet uses momentum 0.01, so after a few hundred steps the running statistics
    still mostly hold their initial values and the model in eval mode scores every image alike.
    """
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return
    saved = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average
    model.train()
    for start in range(0, len(images), batch_size):
        batch = images[start : start + batch_size]
        if len(batch) > 1:
            model(batch.to(next(model.parameters()).device))
    for m, momentum in zip(norms, saved, strict=True):
        m.momentum = momentum


@torch.inference_mode()
def predict(model: Classifier, images: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """Scores in [0, 1] (sigmoid of the logit), shape (N,), float32."""
    dev = next(model.parameters()).device
    out = []
    for start in range(0, len(images), batch_size):
        with autocast(dev):
            logits = model(torch.from_numpy(images[start : start + batch_size]).to(dev, non_blocking=True))
        out.append(torch.sigmoid(logits.float()).cpu())
    return torch.cat(out).numpy().astype(np.float32) if out else np.zeros(0, np.float32)


def train_head(
    images: np.ndarray,
    targets: np.ndarray,
    params: ModelParams,
    *,
    seed: int = 0,
    progress: Progress | None = None,
    pretrained: bytes | None = None,
) -> Classifier:
    """Fit only the head of a frozen-backbone classifier (``params.freeze_backbone``) on ``images``' features.

    The backbone stays exactly as loaded, in eval mode, so every image's features are a fixed function of
    its pixels that scoring may store and reuse. Each image is embedded as it is and flipped left to right
    (the one augmentation fixed features keep); the head is a logistic regression on the standardised
    features, the mean loss over the 2n rows plus an L2 penalty of ``|w|^2 / (2 n)`` (scikit-learn's ``C = 1``
    on the n images; ``C = 0.5`` on the 2n rows), soft targets as in ``train``,
    fit on all of them at once by L-BFGS (deterministic, no learning rate to tune). The standardisation is
    folded into the head's weights, so the model scores raw images like any other.
    """
    torch.manual_seed(seed)
    torch.set_num_threads(max(1, params.threads))
    model = build(params, pretrained)
    if model.backbone_id is None:
        raise ValueError("a frozen backbone needs weights: set model.weights (or freeze_backbone=false)")
    model = model.to(device()).eval()
    y = torch.from_numpy(np.concatenate([targets, targets]).astype(np.float32))
    feats = torch.from_numpy(np.concatenate([embed(model, images), embed(model, images[:, :, ::-1])]))
    if progress:
        progress(1, 2)
    mean, std = feats.mean(0), feats.std(0).clamp_min(1e-6)
    z = (feats - mean) / std
    prior = float(y.mean().clamp(1e-4, 1 - 1e-4))
    w = torch.zeros(z.shape[1], requires_grad=True)
    b = torch.full((1,), math.log(prior / (1 - prior)), requires_grad=True)
    l2 = 1.0 / (2 * len(images))
    opt = torch.optim.LBFGS([w, b], lr=1, max_iter=500, history_size=20, line_search_fn="strong_wolfe")
    loss_fn = nn.BCEWithLogitsLoss()

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = loss_fn(z @ w + b, y) + l2 * (w * w).sum()
        loss.backward()
        return loss

    opt.step(closure)
    head = model.net.get_submodule(head_name(model.net))
    with torch.no_grad():
        head.weight.copy_((w / std).view(1, -1).to(head.weight.device))
        head.bias.copy_((b - (w * mean / std).sum()).to(head.bias.device))
    if progress:
        progress(2, 2)
    return model.cpu().eval()


@torch.inference_mode()
def embed(model: Classifier, images: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """What the head of ``model`` (in eval mode) sees for each of ``images`` (N, H, W, 3) uint8: ``(N, D)``
    float32, D the head's inputs. ``predict_features`` of these equals ``predict`` of the images."""
    head = model.net.get_submodule(head_name(model.net))
    dev = next(model.parameters()).device
    seen: list[torch.Tensor] = []
    hook = head.register_forward_pre_hook(lambda _m, args: seen.append(args[0].float().cpu()))
    try:
        for start in range(0, len(images), batch_size):
            with autocast(dev):
                model(torch.from_numpy(np.ascontiguousarray(images[start : start + batch_size])).to(dev))
    finally:
        hook.remove()
    return torch.cat(seen).numpy() if seen else np.zeros((0, head.in_features), np.float32)


@torch.inference_mode()
def predict_features(model: Classifier, features: np.ndarray) -> np.ndarray:
    """Scores in [0, 1] from ``embed``'s features ``(N, D)``: the head alone, then the sigmoid, in the precision
    ``predict`` runs it (bfloat16 autocast on CUDA)."""
    head = model.net.get_submodule(head_name(model.net))
    dev = head.weight.device
    with autocast(dev):
        logits = head(torch.from_numpy(np.ascontiguousarray(features, np.float32)).to(dev))
    return torch.sigmoid(logits.float().squeeze(1)).cpu().numpy().astype(np.float32)


def precision_of(dev: torch.device) -> str:
    """How ``embed`` computes features on ``dev``: ``fp32`` on the CPU, ``bf16`` under CUDA's autocast. Features
    made one way are not the other's, so the feature cache keeps them apart."""
    return "bf16" if dev.type == "cuda" else "fp32"
