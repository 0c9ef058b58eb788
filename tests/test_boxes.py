"""Box formats and overlaps of lors.models.adamixer.boxes."""
import math

import torch
from torchvision.ops import generalized_box_iou as tv_giou

from lors.models.adamixer import boxes as bx


def random_boxes(*shape: int) -> torch.Tensor:
    """Valid xyxy boxes (positive sizes) of shape (*shape, 4)."""
    xy = torch.rand(*shape, 2) * 100
    wh = torch.rand(*shape, 2) * 50 + 1
    return torch.cat([xy, xy + wh], dim=-1)


def test_conversions_round_trip_with_leading_dims():
    b = random_boxes(3, 7).double()
    assert torch.allclose(bx.cxcywh_to_xyxy(bx.xyxy_to_cxcywh(b)), b)
    assert torch.allclose(bx.xyzr_to_xyxy(bx.xyxy_to_xyzr(b)), b)
    assert torch.allclose(bx.xyzr_to_cxcywh(bx.cxcywh_to_xyzr(bx.xyxy_to_cxcywh(b))), bx.xyxy_to_cxcywh(b))


def test_xyzr_is_log2_scale_and_ratio():
    # an 8 x 2 (w x h) box at (10, 20): z = log2 sqrt(16) = 2, r = log2(2 / 8) = -2
    xyzr = bx.xyxy_to_xyzr(torch.tensor([6.0, 19.0, 14.0, 21.0]))
    assert torch.allclose(xyzr, torch.tensor([10.0, 20.0, 2.0, -2.0]))
    assert torch.allclose(bx.xyzr_to_wh(xyzr), torch.tensor([8.0, 2.0]))


def test_giou_matches_torchvision_and_is_batched():
    a, b = random_boxes(2, 5), random_boxes(2, 4)
    ours = bx.generalized_box_iou(a, b)
    assert ours.shape == (2, 5, 4)
    for i in range(2):
        assert torch.allclose(ours[i], tv_giou(a[i], b[i]), atol=1e-6)


def test_aligned_giou_is_the_diagonal_and_disjoint_boxes_go_negative():
    a, b = random_boxes(6), random_boxes(6)
    assert torch.allclose(bx.aligned_generalized_box_iou(a, b), bx.generalized_box_iou(a, b).diagonal(), atol=1e-6)
    far = torch.tensor([[0.0, 0.0, 1.0, 1.0]]), torch.tensor([[9.0, 9.0, 10.0, 10.0]])
    assert math.isclose(bx.aligned_generalized_box_iou(*far).item(), 2 / 100 - 1, abs_tol=1e-6)
    assert math.isclose(bx.aligned_generalized_box_iou(far[0], far[0]).item(), 1.0, abs_tol=1e-6)


def test_iof_is_the_covered_fraction_of_the_first_box():
    big = torch.tensor([0.0, 0.0, 10.0, 10.0])
    small = torch.tensor([2.0, 2.0, 4.0, 4.0])
    iof = bx.box_iof(torch.stack([big, small]), torch.stack([big, small]))
    assert torch.allclose(iof, torch.tensor([[1.0, 0.04], [1.0, 1.0]]))
    assert torch.allclose(bx.box_iou(big[None], small[None]), torch.tensor([[0.04]]))
