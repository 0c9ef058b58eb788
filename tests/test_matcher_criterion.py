"""Hungarian matching, the set criterion and post-processing on hand-made predictions."""
import math

import pytest
import torch
from torchvision.ops import sigmoid_focal_loss

from lors.models.adamixer.criterion import SetCriterion
from lors.models.adamixer.matcher import HungarianMatcher
from lors.models.adamixer.postprocess import PostProcess

C = 5
WEIGHTS = {"loss_cls": 2.0, "loss_l1": 5.0, "loss_giou": 2.0}


def boxes_in(h: float, w: float, n: int) -> torch.Tensor:
    xy = torch.rand(n, 2) * torch.tensor([w, h]) * 0.6
    wh = torch.rand(n, 2) * torch.tensor([w, h]) * 0.3 + 2
    return torch.cat([xy, xy + wh], dim=-1)


def make_batch(counts=(3, 0, 6), queries=8, seed=0):
    g = torch.manual_seed(seed)
    sizes = [(60.0, 80.0), (50.0, 40.0), (90.0, 120.0)][: len(counts)]
    targets = [{"boxes": boxes_in(h, w, n), "labels": torch.randint(0, C, (n,), generator=g),
                "size": torch.tensor([h, w]), "image_id": i} for i, ((h, w), n) in enumerate(zip(sizes, counts))]
    outputs = {"pred_logits": torch.randn(len(counts), queries, C),
               "pred_boxes": torch.stack([boxes_in(h, w, queries) for h, w in sizes])}
    return outputs, targets


def test_batched_and_per_image_matching_agree():
    matcher = HungarianMatcher()
    for seed in range(3):
        outputs, targets = make_batch(seed=seed)
        batched = matcher(outputs, targets)
        for b, target in enumerate(targets):
            rows, cols = matcher.match_image(outputs["pred_logits"][b], outputs["pred_boxes"][b], target)
            assert torch.equal(batched[b][0], rows) and torch.equal(batched[b][1], cols)
            assert len(rows) == len(target["boxes"])


def test_matching_recovers_a_permutation_of_perfect_predictions():
    outputs, targets = make_batch(counts=(6,), queries=6)
    perm = torch.randperm(6)
    outputs["pred_boxes"][0] = targets[0]["boxes"][perm]
    logits = torch.full((6, C), -8.0)
    logits[torch.arange(6), targets[0]["labels"][perm]] = 8.0
    outputs["pred_logits"][0] = logits
    rows, cols = HungarianMatcher()(outputs, targets)[0]
    assert torch.equal(cols, perm[rows])


def test_perfect_predictions_have_zero_box_losses_and_small_class_loss():
    outputs, targets = make_batch(counts=(4,), queries=4)
    outputs["pred_boxes"][0] = targets[0]["boxes"]
    logits = torch.full((4, C), -10.0)
    logits[torch.arange(4), targets[0]["labels"]] = 10.0
    outputs["pred_logits"][0] = logits
    outputs["stages"] = [dict(outputs)]
    losses = SetCriterion(C, HungarianMatcher(), WEIGHTS)(outputs, targets)
    assert losses["loss_l1_0"].item() == pytest.approx(0.0, abs=1e-6)
    assert losses["loss_giou_0"].item() == pytest.approx(0.0, abs=1e-6)
    assert losses["loss_cls_0"].item() < 1e-6


def test_losses_are_averaged_over_boxes_and_every_stage_is_supervised():
    outputs, targets = make_batch()
    stage = {k: v.clone().requires_grad_() for k, v in outputs.items()}
    outputs = {**stage, "stages": [stage, stage]}
    criterion = SetCriterion(C, HungarianMatcher(), WEIGHTS)
    losses = criterion(outputs, targets)
    assert set(losses) == {f"{t}_{i}" for t in WEIGHTS for i in (0, 1)}
    num_boxes = sum(len(t["boxes"]) for t in targets)
    onehot = torch.zeros_like(stage["pred_logits"])
    for b, (q, j) in enumerate(criterion.matcher(outputs, targets)):
        onehot[b, q, targets[b]["labels"][j]] = 1
    expected = sigmoid_focal_loss(stage["pred_logits"], onehot, alpha=0.25, gamma=2.0, reduction="sum") / num_boxes
    assert losses["loss_cls_1"].item() == pytest.approx(expected.item(), rel=1e-5)
    total = criterion.total(losses)
    assert total.item() == pytest.approx(2 * sum(WEIGHTS[t] * losses[f"{t}_0"].item() for t in WEIGHTS), rel=1e-5)
    total.backward()
    assert torch.isfinite(stage["pred_boxes"].grad).all() and stage["pred_boxes"].grad[1].abs().sum() == 0


def test_images_without_boxes_only_learn_no_object():
    outputs, targets = make_batch(counts=(0, 0))
    outputs = {k: v.requires_grad_() for k, v in outputs.items()}
    outputs["stages"] = [dict(outputs)]
    losses = SetCriterion(C, HungarianMatcher(), WEIGHTS)(outputs, targets)
    assert losses["loss_l1_0"].item() == 0 and losses["loss_giou_0"].item() == 0
    expected = sigmoid_focal_loss(outputs["pred_logits"], torch.zeros_like(outputs["pred_logits"]), reduction="sum")
    assert losses["loss_cls_0"].item() == pytest.approx(expected.item(), rel=1e-5)  # divided by max(0, 1)


def test_labels_outside_the_classes_are_a_clear_error():
    outputs, targets = make_batch(counts=(2,))
    targets[0]["labels"] = torch.tensor([0, C])
    outputs["stages"] = [dict(outputs)]
    with pytest.raises(ValueError, match="contiguous labels"):
        SetCriterion(C, HungarianMatcher(), WEIGHTS)(outputs, targets)


def test_postprocess_top_k_and_rescaling():
    logits = torch.full((1, 3, C), -10.0)
    logits[0, 2, 1], logits[0, 0, 3] = 5.0, 2.0
    boxes = torch.tensor([[[0.0, 0.0, 10.0, 10.0], [1.0, 1.0, 2.0, 2.0], [10.0, 20.0, 30.0, 60.0]]])
    out = PostProcess(max_detections=2)({"pred_logits": logits, "pred_boxes": boxes}, [[50, 40]], [[100, 20]])[0]
    assert out["labels"].tolist() == [1, 3]
    assert out["scores"][0].item() == pytest.approx(1 / (1 + math.exp(-5.0)))
    # width x 0.5, height x 2, clipped to the 20 x 100 original image
    assert torch.allclose(out["boxes"], torch.tensor([[5.0, 40.0, 15.0, 100.0], [0.0, 0.0, 5.0, 20.0]]))
