"""Person re-identification: PK batches, ID + triplet loss, query/gallery mAP and CMC.

``--data`` is ``digits-reid`` (embedded, see `denoiserep.tasks.reid.digits`) or a dataset spec
of `denoiserep.tasks.reid.data.load_reid_spec`: ``market1501:PATH``, ``dukemtmc:PATH``,
``msmt17:PATH``, ``cuhk03_labeled:PATH``, or several joined by commas, whose training sets are
merged (identities and cameras kept disjoint). Evaluation always uses the FIRST dataset's
query/gallery.

Recipe (BoT / TransReID): P identities × K = 4 images per global batch, loss = ID cross-entropy (label smoothing
``--label-smoothing`` as given; 0.1 is the usual value) + batch-hard triplet (margin 0.3) on
the embedding before the BNNeck, inference on that embedding with cosine distance. Under
torchrun the global batch is the single-process one cut into equal contiguous slices, and the
triplet loss mines over the whole global batch (features are all-gathered), so a DDP run
computes the same loss and gradient as one process with the same ``--batch-size``.

Not supported: TransReID's side-information (camera) embedding: the generic training loop
passes only images to the model.
"""

from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset
from torchvision import transforms as T

from ...convert import unwrap
from ...data.images import SkipUnreadable, load_unlabeled_images, read_image, unlabeled_datasets
from ...finite import max_abs_difference, within, worst
from ...head import DenoiseHead
from ...metrics.reid import evaluate_features
from ...models import default_model_for
from ...train.config import TrainConfig
from ...train.distributed import DistInfo, GlobalBatchSampler, loader_options, shard_indices, unlabeled_loader
from ..base import TaskBase, holdout_split
from .data import READERS, MergedReidDataset, ReidSample, load_reid_spec
from .digits import NAME as DIGITS_REID, DigitsReid, load_digits_reid
from .losses import ReidLoss
from .models import ReidModel, create_reid_model
from .sampling import PKBatchSampler

logger = logging.getLogger(__name__)

DEFAULT_INPUT_SIZE = (256, 128)  # (H, W): the standard person-crop size
NUM_INSTANCES = 4  # K images per identity in a batch (BoT / TransReID)
MAX_RANK = 10
FUSED_RELATIVE_TOLERANCE = 1e-5  # the fusion contract: fused == unfused to float32 rounding


# ----------------------------------------------------------------------------
# Datasets, transforms, sampling
# ----------------------------------------------------------------------------


class _TensorReidDataset(Dataset):
    """In-memory images with their identities: items ``(image, pid)``."""

    def __init__(self, images: torch.Tensor, pids: torch.Tensor):
        self.images, self.pids = images, pids

    def __len__(self) -> int:
        return len(self.pids)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.images[index], int(self.pids[index])


class _ImageReidDataset(Dataset):
    """Image files of ReID samples: items ``(transformed image, pid)`` (the engine's 2-tuples)."""

    def __init__(self, samples: list[ReidSample], transform):
        self.samples, self.transform = samples, transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        sample = self.samples[index]
        return self.transform(read_image(sample.path)), sample.pid


def reid_transforms(size: tuple[int, int], mean, std) -> tuple[T.Compose, T.Compose]:
    """TransReID's train/eval pipelines: resize, flip, pad 10 + random crop, normalise, random erasing."""
    normalize = T.Normalize(mean=mean, std=std)
    resize = T.Resize(size, interpolation=T.InterpolationMode.BICUBIC)
    train = T.Compose([
        resize, T.RandomHorizontalFlip(p=0.5), T.Pad(10), T.RandomCrop(size), T.ToTensor(), normalize,
        T.RandomErasing(p=0.5, value=0),  # 0 after normalisation = the mean pixel
    ])
    return train, T.Compose([resize, T.ToTensor(), normalize])


def _gather_rows(local: torch.Tensor, total: int, info: DistInfo) -> torch.Tensor:
    """Reassemble rows sharded by `shard_indices` (rank r holds rows r, r + W, …) on every rank."""
    if info.world_size == 1 or not (dist.is_available() and dist.is_initialized()):
        return local
    world = info.world_size
    per_rank = -(-total // world)
    padded = local.new_zeros((per_rank, *local.shape[1:]))
    padded[:len(local)] = local
    gathered = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(gathered, padded)
    out = local.new_empty((total, *local.shape[1:]))
    for r in range(world):
        out[r::world] = gathered[r][:len(range(r, total, world))]
    return out


@dataclass(frozen=True)
class ReidEvalSet:
    """What one evaluation split scores: query + gallery images (queries first) and their ids."""

    images: Dataset
    q_pids: np.ndarray
    q_camids: np.ndarray
    g_pids: np.ndarray
    g_camids: np.ndarray

    @property
    def num_query(self) -> int:
        return len(self.q_pids)

    @property
    def num_gallery(self) -> int:
        return len(self.g_pids)

    def split(self, fraction: float, name: str) -> tuple["ReidEvalSet", "ReidEvalSet | None"]:
        """(validation, held-out test) by identity (`holdout_split` over the sorted identities of query
        and gallery): a test identity's queries and gallery images are all in the test split."""
        if fraction <= 0:
            return self, None
        identities = sorted(set(self.q_pids.tolist()) | set(self.g_pids.tolist()))
        _, test_idx = holdout_split(len(identities), fraction, what=f"query/gallery identities of {name}")
        test_ids = {identities[i] for i in test_idx}
        pids = np.concatenate([self.q_pids, self.g_pids])
        in_test = np.array([pid in test_ids for pid in pids.tolist()], dtype=bool)

        def part(mask: np.ndarray) -> "ReidEvalSet":
            q_mask, g_mask = mask[:self.num_query], mask[self.num_query:]
            return ReidEvalSet(Subset(self.images, np.flatnonzero(mask).tolist()), self.q_pids[q_mask],
                               self.q_camids[q_mask], self.g_pids[g_mask], self.g_camids[g_mask])

        return part(~in_test), part(in_test)


def _ids(samples) -> tuple[np.ndarray, np.ndarray]:
    return np.array([s.pid for s in samples], dtype=np.int64), np.array([s.camid for s in samples], dtype=np.int64)


# ----------------------------------------------------------------------------
# The task
# ----------------------------------------------------------------------------


class ReidTask(TaskBase):
    """Person re-identification; see `denoiserep.tasks.base.Task` for the interface."""

    name = "reid"
    primary_metric = "mAP"
    metric_label = "mAP"
    data_sources = f"{DIGITS_REID} | NAME:PATH[,NAME:PATH …] (NAME: {', '.join(READERS)})"
    demo_defaults = {"task": "reid", "data": DIGITS_REID, "epochs": 40, "extra_epochs": 10, "label_smoothing": 0.1,
                     "name": "demo-reid"}
    demo_note = ("Note: this is a smoke demo of the ReID pipeline on handwritten digits (identity = digit × "
                 "handwriting style), not a ReID benchmark.\n")
    supports_test_split = True

    def __init__(self, cfg: TrainConfig):
        super().__init__(cfg)
        spec = cfg.data.strip()
        self.is_digits = spec == DIGITS_REID
        if self.is_digits:
            full = self._init_digits()
        else:
            full = self._init_disk(spec)
        self.eval_name = getattr(self, "eval_name", self.dataset_name)
        # The validation query/gallery, and (--test-fraction) the held-out test identities.
        self.val, self.test = full.split(cfg.test_fraction, self.eval_name)
        for split in (self.val, self.test):
            if split is not None:
                self._check_protocol(split)
        self.loss = ReidLoss(label_smoothing=cfg.label_smoothing)
        self.extra, self.denoise_train = unlabeled_datasets(cfg.extra_data, cfg.denoise_data, self._unlabeled,
                                                            cfg.skip_bad_images)
        if cfg.skip_bad_images:
            self.train = SkipUnreadable(self.train)  # training only: evaluation images keep their identities

    def _init_digits(self) -> ReidEvalSet:
        if self.cfg.image_size not in (None, 8):
            raise ValueError(f"'{DIGITS_REID}' has 8x8 images, so image_size={self.cfg.image_size} cannot be applied; "
                             "leave --image-size unset")
        data: DigitsReid = load_digits_reid()
        self.dataset_name = data.name
        self.num_train_pids = data.num_train_pids
        self.num_instances = NUM_INSTANCES
        self.input_size = data.input_shape[1:]
        self.in_chans = data.input_shape[0]
        self.train_pids = data.train.pids.tolist()
        self.train = _TensorReidDataset(data.train.images, data.train.pids)
        self.eval_transform = None
        return ReidEvalSet(_TensorReidDataset(torch.cat([data.query.images, data.gallery.images]),
                                              torch.cat([data.query.pids, data.gallery.pids])),
                           data.query.pids.numpy(), data.query.camids.numpy(), data.gallery.pids.numpy(),
                           data.gallery.camids.numpy())

    def _init_disk(self, spec: str) -> ReidEvalSet:
        if ":" not in spec:
            raise ValueError(
                f"unknown ReID data {spec!r}: use '{DIGITS_REID}' (embedded) or NAME:PATH[,NAME:PATH...] with NAME in "
                "market1501, dukemtmc, msmt17, cuhk03_labeled, cuhk03_detected (e.g. market1501:/data/Market-1501)"
            )
        if self.cfg.model is None:
            raise ValueError(
                f"--data {spec}: pass --model, any timm model, e.g. vit_base_patch16_224 (with --model-kwargs "
                "'{\"patch_stride\": 12}' for TransReID's overlapping patches) or resnet50"
            )
        merged: MergedReidDataset = load_reid_spec(spec)
        part = merged.parts[0]
        self.dataset_name = merged.name
        self.eval_name = part.name
        self.num_train_pids = merged.num_train_pids
        self.num_instances = NUM_INSTANCES
        self.input_size = self._disk_input_size()
        self.in_chans = 3  # images are read as RGB
        mean, std = self._normalization()
        train_tf, self.eval_transform = reid_transforms(self.input_size, mean, std)
        self.train_pids = [s.pid for s in merged.train]
        self.train = _ImageReidDataset(list(merged.train), train_tf)
        return ReidEvalSet(_ImageReidDataset(list(part.query) + list(part.gallery), self.eval_transform),
                           *_ids(part.query), *_ids(part.gallery))

    def _disk_input_size(self) -> tuple[int, int]:
        """(H, W): ``img_size`` of --model-kwargs, else --image-size H as H × H/2, else 256 × 128."""
        img_size = self.cfg.model_kwargs.get("img_size")
        if img_size is not None:
            size = (int(img_size), int(img_size)) if isinstance(img_size, int) else tuple(int(s) for s in img_size)
            if self.cfg.image_size is not None and self.cfg.image_size != size[0]:
                raise ValueError(f"--image-size {self.cfg.image_size} disagrees with img_size {list(size)} "
                                 "of --model-kwargs; give one of them")
            return size
        if self.cfg.image_size is not None:
            return (self.cfg.image_size, self.cfg.image_size // 2)
        return DEFAULT_INPUT_SIZE

    def _normalization(self):
        """The mean/std of the backbone's timm pretrained config (what its weights expect)."""
        from timm.models import get_pretrained_cfg

        name = self.cfg.model or ""
        pretrained = get_pretrained_cfg(name) if name else None
        mean = getattr(pretrained, "mean", None) or IMAGENET_DEFAULT_MEAN
        std = getattr(pretrained, "std", None) or IMAGENET_DEFAULT_STD
        if self.in_chans != len(mean):
            mean, std = (float(np.mean(mean)),) * self.in_chans, (float(np.mean(std)),) * self.in_chans
        return mean, std

    def _check_protocol(self, split: ReidEvalSet) -> None:
        """Fail before training if an evaluation split cannot be scored; warn about queries
        that will be skipped (no same-identity gallery image from another camera)."""
        name = self.eval_name
        if not len(set(split.q_pids.tolist()) & set(split.g_pids.tolist())):
            raise ValueError(
                f"{name}: none of the {split.num_query} query identities appear in the {split.num_gallery}-image "
                "gallery, so no query can be scored; query/ and bounding_box_test/ must come from the same dataset"
            )
        gallery_cams: dict[int, set[int]] = {}
        for pid, cam in zip(split.g_pids.tolist(), split.g_camids.tolist()):
            gallery_cams.setdefault(pid, set()).add(cam)
        queries = zip(split.q_pids.tolist(), split.q_camids.tolist())
        valid = sum(bool(gallery_cams.get(pid, set()) - {cam}) for pid, cam in queries)
        if valid == 0:
            raise ValueError(
                f"{name}: no query has a same-identity gallery image from ANOTHER camera; the ReID protocol "
                "discards same-camera matches, so nothing can be scored. Check the camera ids in the file names."
            )
        if valid < split.num_query:
            logger.warning("%s: %d of %d queries have no cross-camera match in the gallery and will be skipped "
                           "(reported as skipped_queries)", name, split.num_query - valid, split.num_query)

    def _unlabeled(self, path: str) -> Dataset:
        """Unlabeled images (items ``(image, -1)``): for on-disk data through the ReID eval
        pipeline (resize to H × W, normalise); for digits-reid as classification's digits do."""
        dataset = load_unlabeled_images(path, image_size=self.input_size[0], in_chans=self.in_chans)
        if self.eval_transform is not None:
            dataset.transform = self.eval_transform
        return dataset

    # -- model ------------------------------------------------------------------------------
    def build_model(self) -> nn.Module:
        if self.is_digits:
            name, kwargs = (self.cfg.model, {}) if self.cfg.model else default_model_for("digits")
            kwargs.update(self.cfg.model_kwargs)
            kwargs.setdefault("in_chans", self.in_chans)
        else:
            name, kwargs = self.cfg.model, dict(self.cfg.model_kwargs)
        if "num_classes" in kwargs:
            raise ValueError(
                f"num_classes={kwargs['num_classes']} in --model-kwargs: the ID classifier has one output per "
                f"training identity ({self.num_train_pids} in {self.dataset_name}); drop num_classes"
            )
        return create_reid_model(name, self.num_train_pids, input_size=tuple(self.input_size), **kwargs)

    def feature_dim(self, model: nn.Module) -> int:
        return unwrap(model).num_features

    def wrap_with_head(self, model: nn.Module, head: DenoiseHead) -> nn.Module:
        """DenoiseRep⁻: the head denoises the embedding before the BNNeck (and the retrieval)."""
        if not isinstance(model, ReidModel):
            raise ValueError(f"DenoiseRep⁻ for ReID needs a ReidModel, got {type(model).__name__}")
        model.denoise_head = head
        return model

    def example_inputs(self, device: torch.device, batch: int = 2) -> torch.Tensor:
        count = min(batch, len(self.val.images))
        return torch.stack([self.val.images[i][0] for i in range(count)]).to(device)

    # -- training -----------------------------------------------------------------------------
    def train_loader(self, info: DistInfo, seed: int, epoch: int, for_denoisers: bool = False) -> DataLoader:
        """P×K global batches of ``cfg.batch_size`` (sliced across ranks); the denoise stage may
        train on ``--denoise-data`` (unlabeled, plain shuffled batches) instead."""
        if for_denoisers and self.denoise_train is not None:
            sampler = GlobalBatchSampler(len(self.denoise_train), self.cfg.batch_size, info, seed, epoch)
            return DataLoader(self.denoise_train, batch_sampler=sampler, **loader_options(self.cfg))
        sampler = PKBatchSampler(self.train_pids, self.cfg.batch_size, self.num_instances, info, seed, epoch)
        return DataLoader(self.train, batch_sampler=sampler, **loader_options(self.cfg))

    def extra_loader(self, info: DistInfo, seed: int, epoch: int) -> DataLoader | None:
        """Unlabeled images for the label-free loss (the paper's "merged datasets")."""
        return unlabeled_loader(self.extra, self.cfg.batch_size, info, seed, epoch, loader_options(self.cfg))

    def training_loss(self, model: nn.Module, batch) -> tuple[torch.Tensor, dict[str, float]]:
        """ID cross-entropy + batch-hard triplet on the train-mode output (no mixup: mixing
        identities would break the triplet loss's positives)."""
        inputs, pids = batch
        return self.loss(model(inputs), pids), {}

    # -- evaluation ---------------------------------------------------------------------------
    @torch.no_grad()
    def _features(self, model: nn.Module, info: DistInfo, device: torch.device,
                  autocast_dtype: torch.dtype | None = None, split: ReidEvalSet | None = None) -> torch.Tensor:
        """Embeddings of query + gallery (in that order) of ``split`` (the validation split by default),
        each rank extracting its shard."""
        images = (split or self.val).images
        was_training = model.training
        model.eval()
        indices = shard_indices(len(images), info)
        loader = DataLoader(Subset(images, indices), batch_size=self.cfg.eval_batch_size,
                            **loader_options(self.cfg))
        chunks = []
        for inputs, _ in loader:
            with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                chunks.append(model(inputs.to(device)).float())
        model.train(was_training)
        local = torch.cat(chunks) if chunks else torch.zeros((0, self.feature_dim(model)), device=device)
        return _gather_rows(local, len(images), info)

    @torch.no_grad()
    def evaluate(self, model: nn.Module, info: DistInfo, device: torch.device,
                 autocast_dtype: torch.dtype | None = None, split: str = "val") -> dict[str, float]:
        """mAP and CMC rank-1/5/10 (%) on the (first dataset's) query/gallery, cosine distance on
        L2-normalised embeddings, same-identity same-camera gallery images discarded."""
        part: ReidEvalSet = self.eval_split(split)
        features = self._features(model, info, device, autocast_dtype, part)
        query, gallery = features[:part.num_query], features[part.num_query:]
        try:
            result = evaluate_features(query, gallery, part.q_pids, part.g_pids, part.q_camids, part.g_camids,
                                       metric="cosine", normalize=True, max_rank=MAX_RANK)
        except ValueError as error:
            raise ValueError(f"ReID evaluation on {self.eval_name} ({part.num_query} queries, {part.num_gallery} "
                             f"gallery images) failed: {error}") from None
        cmc = result.cmc
        return {"mAP": 100.0 * result.mAP, "rank1": 100.0 * float(cmc[0]), "rank5": 100.0 * float(cmc[4]),
                "rank10": 100.0 * float(cmc[9]), "num_query": part.num_query, "num_gallery": part.num_gallery,
                "skipped_queries": result.num_skipped_queries}

    def validation_inputs(self, max_batches: int) -> list[torch.Tensor]:
        """The first ``max_batches`` query + gallery batches, images only (fixed: for noise-loss diagnostics)."""
        loader = DataLoader(self.val.images, batch_size=self.cfg.eval_batch_size, **loader_options(self.cfg))
        return [inputs for inputs, _ in itertools.islice(loader, max_batches)]

    @torch.no_grad()
    def predictions(self, model: nn.Module, device: torch.device) -> torch.Tensor:
        """Query + gallery embeddings (single process): used to compare fused vs unfused."""
        return self._features(model, DistInfo(), device).cpu()

    def compare_outputs(self, unfused: torch.Tensor, fused: torch.Tensor) -> dict:
        """Fused vs unfused embeddings (query + gallery, from `predictions`): the largest absolute
        and relative difference, and ``prediction_changes``, the number of queries whose nearest
        gallery image (rank-1 retrieval, cosine) changes."""
        def nearest(features: torch.Tensor) -> torch.Tensor:
            features = F.normalize(features.float(), dim=1)
            return (features[:self.val.num_query] @ features[self.val.num_query:].T).argmax(1)

        error = max_abs_difference(unfused, fused)
        return {"fused_vs_unfused_max_feature_error": error,
                "fused_vs_unfused_max_relative_error": error / max(float(unfused.abs().max()), 1e-12),
                "prediction_changes": int((nearest(fused) != nearest(unfused)).sum())}

    def fused_check(self, results: list) -> str:
        """The report's "fused == unfused" cell for DenoiseRep results (one per seed).

        A fused model computes the unfused function up to float32 rounding (relative error
        ~1e-7); mAP ranks hundreds of distances per query, and near-tied gallery images can
        swap under such rounding, so mAP may move in its last digits although the model is
        the same. The check is on the embeddings (relative error ≤ 1e-5, the fusion contract);
        the mAP difference and rank-1 changes are reported next to it.
        """
        error = worst(r.extra.get("fused_vs_unfused_max_relative_error", r.extra.get("fuse_max_relative_error", 0.0))
                      for r in results)
        gap = worst(abs(r.extra["unfused_metrics"][self.primary_metric] - r.metrics[self.primary_metric])
                    for r in results)
        changes = sum(r.extra.get("prediction_changes", 0) for r in results)
        detail = f"embeddings within {error:.0e}"
        detail += ", mAP identical" if gap == 0 else f", mAP within {gap:.1e} (near-tied distances)"
        if changes:
            detail += f", {changes} rank-1 matches swapped"
        if within(error, FUSED_RELATIVE_TOLERANCE):
            return f"yes ({detail})"
        return f"NO: {detail}"
