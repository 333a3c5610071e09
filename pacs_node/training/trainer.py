"""The training loop: cached phantom cases, MONAI augmentation, Dice + cross-entropy (on label
values, or on label fractions for a sub-voxel boundary), a validation pass each epoch with
early stopping, and the best weights written as a bundle.

Cases are rendered once (in a process pool) and augmented on the fly, because rendering costs
seconds and an augmented view of a cached case costs a tenth of one. On a GPU the augmentation,
not the network, sets the pace, so ``loaders`` processes prepare patches while the GPU trains.
"""

from __future__ import annotations

import importlib
import logging
import platform
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from numpy.typing import NDArray

from pacs_node.training.dataset import Sample, make_sample
from pacs_node.training.recipe import Recipe

log = logging.getLogger(__name__)

# (stage, done, total, message)
Progress = Callable[[str, int, int, str], None]


@dataclass
class TrainingResult:
    """What the model card quotes about training."""

    best_epoch: int
    epochs_run: int
    best_val_dice: float
    val_dice_per_label: dict[str, float]
    minutes: float
    cases: int
    parameters: int
    history: list[dict[str, float]] = field(default_factory=list)
    init: str | None = None  # weights the run started from
    machine: str = ""  # what trained it, for the model card
    state_dict: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)


def build_network(recipe: Recipe) -> torch.nn.Module:
    """The recipe's MONAI UNet (also what configs/inference.json instantiates)."""
    from monai.networks.nets.unet import UNet

    args = network_args(recipe)
    args.pop("_target_")
    network: torch.nn.Module = UNet(**args)
    return network


def network_args(recipe: Recipe) -> dict[str, Any]:
    """``network_def`` as configs/inference.json spells it."""
    net = recipe.network
    depth = len(net.channels) - 1
    stride: Any = [2, 2, 1] if net.two_d else 2
    kernel: Any = [3, 3, 1] if net.two_d else 3
    return {
        "_target_": "monai.networks.nets.UNet",
        "spatial_dims": 3,
        "in_channels": 1,
        "out_channels": len(recipe.labels) + 1,
        "channels": list(net.channels),
        "strides": [stride] * depth,
        "kernel_size": kernel,
        "up_kernel_size": kernel,
        "num_res_units": net.num_res_units,
        "dropout": net.dropout,
        "norm": "INSTANCE",
    }


def _swap_pairs(recipe: Recipe) -> list[tuple[int, int]]:
    """Channel pairs a left-right flip exchanges (lung_left <-> lung_right, ...)."""
    index = {name: i + 1 for i, name in enumerate(recipe.labels)}
    pairs = []
    for name, value in index.items():
        if name.endswith("_left") and name.replace("_left", "_right") in index:
            pairs.append((value, index[name.replace("_left", "_right")]))
    return pairs


def augmentation(recipe: Recipe, stream: int = 0) -> Callable[[dict[str, Any]], dict[str, Any]]:
    """MONAI dictionary transforms: pad/crop to the patch, rotation + scaling, elastic warp,
    left-right flip (labels swapped), intensity scale/shift and noise. Label fractions are
    interpolated like the image; label values by nearest neighbour. ``stream`` separates the
    random draws of parallel loader processes."""
    mt: Any = importlib.import_module("monai.transforms")

    aug = recipe.augmentation
    patch = recipe.patch_xyz
    rot = np.deg2rad(aug.rotate_deg)
    two_d = recipe.network.two_d
    keys = ["image", "label"]
    label_mode = "bilinear" if recipe.soft_labels else "nearest"
    steps: list[Any] = [
        mt.SpatialPadd(keys, spatial_size=patch, mode="constant", value=0),
        mt.RandSpatialCropd(keys, roi_size=patch, random_size=False),
        mt.RandAffined(
            keys,
            prob=aug.affine_prob,
            rotate_range=(0.0, 0.0, rot) if two_d else (rot / 2, rot / 2, rot),
            scale_range=(aug.scale, aug.scale, 0.0) if two_d else (aug.scale,) * 3,
            mode=("bilinear", label_mode),
            padding_mode="border",
        ),
    ]
    if aug.elastic_prob > 0 and not two_d:
        steps.append(
            mt.Rand3DElasticd(
                keys,
                sigma_range=(5, 8),
                magnitude_range=(50, 150),
                prob=aug.elastic_prob,
                mode=("bilinear", label_mode),
                padding_mode="border",
            )
        )
    steps += [
        mt.RandScaleIntensityd("image", factors=0.1, prob=aug.intensity_prob),
        mt.RandShiftIntensityd("image", offsets=0.1, prob=aug.intensity_prob),
        mt.RandGaussianNoised("image", std=aug.noise_std, prob=aug.intensity_prob),
    ]
    compose = mt.Compose(steps)
    pairs = _swap_pairs(recipe)
    rng = np.random.default_rng([recipe.seed + 1, stream])

    def run(data: dict[str, Any]) -> dict[str, Any]:
        out: dict[str, Any] = compose(data)
        if aug.flip_prob > 0 and rng.random() < aug.flip_prob:
            image = torch.flip(torch.as_tensor(out["image"]), dims=[1])
            label = torch.flip(torch.as_tensor(out["label"]), dims=[1])
            swapped = label.clone()
            for a, b in pairs:
                if recipe.soft_labels:  # one channel per label: channel a - 1 holds label a
                    swapped[a - 1], swapped[b - 1] = label[b - 1], label[a - 1]
                else:
                    swapped[label == a] = b
                    swapped[label == b] = a
            out = {"image": image, "label": swapped}
        return out

    compose.set_random_state(seed=recipe.seed + 7919 * stream)
    return run


def render_samples(
    seeds: list[int], recipe: Recipe, progress: Progress, stage: str, workers: int
) -> list[Sample]:
    """Render and prepare cases, ``workers`` processes at a time."""
    out: list[Sample] = []
    if workers <= 1 or len(seeds) < 2:
        for i, seed in enumerate(seeds):
            out.append(make_sample(seed, recipe))
            progress(stage, i + 1, len(seeds), f"seed {seed}")
        return out
    with ProcessPoolExecutor(max_workers=workers) as pool:
        for i, sample in enumerate(pool.map(make_sample, seeds, [recipe] * len(seeds))):
            out.append(sample)
            progress(stage, i + 1, len(seeds), f"seed {sample.seed}")
    return out


def training_target(sample: Sample, recipe: Recipe) -> NDArray[Any]:
    """What augmentation moves along with the image: label values, or label fractions (float,
    0..1) when the recipe trains on them."""
    if not recipe.soft_labels:
        return sample.labels
    if sample.fractions is None:
        raise ValueError(f"case {sample.seed} was prepared without label fractions")
    shares: NDArray[Any] = sample.fractions.astype(np.float32) / np.float32(255.0)
    return shares


class PatchStream(torch.utils.data.IterableDataset[dict[str, torch.Tensor]]):
    """Endless augmented patches of randomly drawn cached cases. Each loader process draws
    from its own seeded stream (the main process is stream 0)."""

    def __init__(self, samples: list[Sample], recipe: Recipe) -> None:
        self.samples = samples
        self.recipe = recipe

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        info = torch.utils.data.get_worker_info()
        stream = 0 if info is None else info.id + 1
        augment = augmentation(self.recipe, stream)
        rng = np.random.default_rng([self.recipe.seed, stream])
        while True:
            sample = self.samples[int(rng.integers(0, len(self.samples)))]
            out = augment({"image": sample.image, "label": training_target(sample, self.recipe)})
            image = _plain(out["image"]).float()
            label = _plain(out["label"])
            label = label.float() if self.recipe.soft_labels else label.long()
            yield {"image": image, "label": label}


def _plain(value: Any) -> torch.Tensor:
    """A plain tensor (MONAI returns MetaTensors, which collate slowly and carry metadata)."""
    tensor = torch.as_tensor(value)
    as_tensor = getattr(tensor, "as_tensor", None)
    return as_tensor() if callable(as_tensor) else tensor


def _loader_setup(_: int) -> None:
    torch.set_num_threads(1)  # loaders are many processes already


def patch_batches(
    samples: list[Sample], recipe: Recipe, loaders: int, pin: bool
) -> Iterator[dict[str, torch.Tensor]]:
    """Batches of augmented patches, made in ``loaders`` processes (0: in this one)."""
    loader = torch.utils.data.DataLoader(
        PatchStream(samples, recipe),
        batch_size=recipe.batch_size,
        num_workers=loaders,
        worker_init_fn=_loader_setup if loaders else None,
        pin_memory=pin,
        prefetch_factor=4 if loaders else None,
        persistent_workers=loaders > 0,
    )
    return iter(loader)


def describe_device(device: torch.device, recipe: Recipe, loaders: int) -> str:
    """What trained the weights, in words for the model card."""
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} GPU, {loaders} loader processes"
    return f"{platform.machine()} CPU, {recipe.threads} threads"


def resolve_device(name: str) -> torch.device:
    """``auto`` takes a CUDA GPU when there is one; asking for one that is absent fails."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name}: no CUDA GPU is available")
    return device


def soft_target(label: torch.Tensor) -> torch.Tensor:
    """Label fractions (batch, labels, ...) with the background channel in front, each voxel
    summing to one (padding and interpolation leave small excesses and gaps)."""
    label = label.clamp(0.0, 1.0)
    covered = label.sum(dim=1, keepdim=True)
    background = (1.0 - covered).clamp(min=0.0)
    target = torch.cat([background, label], dim=1)
    return target / target.sum(dim=1, keepdim=True).clamp(min=1e-6)


def dice_per_label(pred: NDArray[Any], truth: NDArray[Any], labels: int) -> list[float]:
    """Dice of each label value 1..labels (1.0 when both are empty)."""
    scores = []
    for value in range(1, labels + 1):
        p, t = pred == value, truth == value
        denom = int(p.sum()) + int(t.sum())
        scores.append(1.0 if denom == 0 else 2.0 * int((p & t).sum()) / denom)
    return scores


def _validate(
    network: torch.nn.Module, samples: list[Sample], recipe: Recipe, device: torch.device
) -> NDArray[np.float64]:
    from monai.inferers.utils import sliding_window_inference

    network.eval()
    scores = []
    with torch.inference_mode(), _autocast(device):
        for sample in samples:
            image = torch.from_numpy(sample.image)[None].to(device)
            logits = sliding_window_inference(
                image, recipe.patch_xyz, 4, network, overlap=0.25, mode="gaussian"
            )
            assert isinstance(logits, torch.Tensor)
            pred = logits.argmax(dim=1)[0].cpu().numpy()
            scores.append(dice_per_label(pred, sample.labels[0], len(recipe.labels)))
    network.train()
    means: NDArray[np.float64] = np.asarray(scores, dtype=np.float64).mean(axis=0)
    return means


def _autocast(device: torch.device) -> Any:
    """bfloat16 matrix work on a GPU (the loss stays in float32); full precision on the CPU."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


def learning_rate(
    recipe: Recipe, step: int, total: int, loop_start: float, deadline: float
) -> float:
    """Short warm-up, then cosine decay over whichever runs out first, the planned steps or
    the time budget, so a run cut short by ``max_minutes`` still ends at a low rate."""
    warmup = max(1, total // 30)
    if step < warmup:
        return recipe.learning_rate * (step + 1) / warmup
    now = time.perf_counter()
    by_time = (now - loop_start) / max(deadline - loop_start, 1e-6)
    progress = min(1.0, max(step / total, by_time))
    return recipe.learning_rate * (0.02 + 0.98 * 0.5 * (1 + float(np.cos(np.pi * progress))))


def warm_start(network: torch.nn.Module, weights: Path) -> list[str]:
    """Copy every tensor of ``weights`` whose name and shape match the network (a finished
    stage, or a model with other output labels: its last layer is left as initialised).
    Returns the names left out."""
    state = torch.load(str(weights), map_location="cpu", weights_only=True)
    own = network.state_dict()
    usable = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    own.update(usable)
    network.load_state_dict(own)
    return sorted(set(own) - set(usable))


def train(
    recipe: Recipe,
    progress: Progress,
    *,
    workers: int = 1,
    init: Path | None = None,
    device: str = "cpu",
    loaders: int = 0,
) -> TrainingResult:
    """Train the recipe's network (from ``init`` weights when given) on ``device``, with
    ``workers`` processes rendering cases and ``loaders`` augmenting patches; returns the
    best weights (by mean validation Dice), on the CPU."""
    from monai.losses.dice import DiceCELoss

    started = time.perf_counter()
    target = resolve_device(device)
    torch.backends.cudnn.benchmark = target.type == "cuda"  # one patch size throughout
    torch.manual_seed(recipe.seed)
    torch.set_num_threads(recipe.threads)
    train_seeds = list(range(*recipe.train_seeds))
    val_seeds = list(range(*recipe.val_seeds))
    training = render_samples(train_seeds, recipe, progress, "render training cases", workers)
    validation = render_samples(val_seeds, recipe, progress, "render validation cases", workers)
    network = build_network(recipe)
    if init is not None:
        skipped = warm_start(network, init)
        log.info("warm start", extra={"weights": str(init), "skipped": len(skipped)})
    batches = patch_batches(training, recipe, loaders, pin=target.type == "cuda")
    network.to(target)
    parameters = sum(p.numel() for p in network.parameters())
    loss_fn = DiceCELoss(to_onehot_y=not recipe.soft_labels, softmax=True, include_background=False)
    optimiser = torch.optim.AdamW(network.parameters(), lr=recipe.learning_rate, weight_decay=1e-5)
    total_steps = recipe.epochs * recipe.steps_per_epoch
    done_steps = 0
    best = -1.0
    best_epoch = 0
    best_state: dict[str, torch.Tensor] = {}
    best_labels: list[float] = []
    history: list[dict[str, float]] = []
    epoch = 0
    deadline = started + recipe.max_minutes * 60.0
    loop_start = time.perf_counter()
    network.train()
    for epoch in range(1, recipe.epochs + 1):
        losses = []
        for step in range(recipe.steps_per_epoch):
            batch = next(batches)
            image = batch["image"].to(target, non_blocking=True)
            label = batch["label"].to(target, non_blocking=True)
            if recipe.soft_labels:
                label = soft_target(label)
            for group in optimiser.param_groups:
                group["lr"] = learning_rate(recipe, done_steps, total_steps, loop_start, deadline)
            optimiser.zero_grad()
            with _autocast(target):
                logits = network(image)
            loss = loss_fn(logits.float(), label)
            loss.backward()
            optimiser.step()
            done_steps += 1
            losses.append(float(loss.detach()))
            progress(
                f"epoch {epoch}/{recipe.epochs}",
                step + 1,
                recipe.steps_per_epoch,
                f"loss {np.mean(losses):.3f} best val Dice {max(best, 0):.3f}",
            )
        dice = _validate(network, validation, recipe, target)
        mean = float(dice.mean())
        history.append({"epoch": epoch, "loss": float(np.mean(losses)), "val_dice": mean})
        log.info("epoch done", extra={"epoch": epoch, "val_dice": round(mean, 4)})
        if mean > best:
            best, best_epoch = mean, epoch
            best_labels = [float(d) for d in dice]
            best_state = {k: v.detach().cpu().clone() for k, v in network.state_dict().items()}
        if epoch - best_epoch >= recipe.patience or time.perf_counter() > deadline:
            break
    return TrainingResult(
        best_epoch=best_epoch,
        epochs_run=epoch,
        best_val_dice=best,
        val_dice_per_label=dict(zip(recipe.labels, best_labels, strict=True)),
        minutes=(time.perf_counter() - started) / 60.0,
        cases=len(training),
        parameters=parameters,
        history=history,
        init=None if init is None else str(init),
        machine=describe_device(target, recipe, loaders),
        state_dict=best_state,
    )
