"""The task heads of the usual model families: what ``exclude_classifier`` leaves without a denoiser.

DenoiseRep denoises a backbone's embedding layers; the layers that map its features to the task's
outputs (class scores, boxes, masks) are the head. Each family says where its head is in its own way:

- timm (and any model with timm's interface): ``get_classifier()``;
- Hugging Face: every module of a task model outside its ``base_model`` (``classifier`` of the
  ``*ForImageClassification`` models, SegFormer's ``decode_head``, DETR's ``class_labels_classifier``
  and ``bbox_predictor``);
- torchvision: classifiers' ``fc`` / ``classifier`` / ``heads`` / ``head``, segmentation models'
  ``classifier`` / ``aux_classifier``, detectors' ``rpn`` / ``roi_heads`` / ``head``.

A model of another kind has no recognised head: all its layers are candidates (``convert``'s
summary lists what it converted, so a head that was converted is visible there).
"""

from __future__ import annotations

from torch import nn

_TORCHVISION_HEADS = {
    "torchvision.models.detection": ("rpn", "roi_heads", "head"),
    "torchvision.models.segmentation": ("classifier", "aux_classifier"),
    "torchvision.models": ("fc", "classifier", "heads", "head"),
}


def task_heads(model: nn.Module) -> dict[str, nn.Module]:
    """The head modules of ``model`` by name (as in ``model.named_modules()``), or {} if none is known."""
    get_classifier = getattr(model, "get_classifier", None)
    if callable(get_classifier):
        classifier = get_classifier()
        if isinstance(classifier, nn.Module):
            return {name: module for name, module in model.named_modules() if module is classifier and name}
    module_path = type(model).__module__
    if module_path.startswith("transformers."):
        base = getattr(model, "base_model", None)
        if isinstance(base, nn.Module) and base is not model:
            return {name: child for name, child in model.named_children() if child is not base}
        return {}
    for package, names in _TORCHVISION_HEADS.items():
        if module_path.startswith(package + "."):
            return {name: child for name, child in model.named_children() if name in names}
    return {}
