"""Task losses against hand computations from the original code's definitions
(auto-lambda's ``compute_loss``, unchanged in the DGR repository)."""

import math

import numpy as np
import pytest

from dgr_jax.tasks import CITYSCAPES, NYUV2, Task, task_losses

ODD = np.array([1.0, -1.0, 0.0]) / math.sqrt(2.0)  # a unit normal whose channels sum to 0


def test_normal_loss_is_l1_between_unit_normals_over_valid_pixels_by_hand():
    # Pixels: a, b valid; c all-zero target (invalid for everyone); d's target sums to 0,
    # which the original's `torch.sum(gt, dim=1) != 0` counts as invalid.
    target = np.array([[0.0, 0.0, 1.0], [0.6, 0.0, 0.8], [0.0, 0.0, 0.0], ODD])
    prediction = np.array([[0.6, 0.0, 0.8], [0.0, 0.6, 0.8], [0.0, 1.0, 0.0], -ODD])
    # |a| = 0.6 + 0 + 0.2 = 0.8; |b| = 0.6 + 0.6 + 0 = 1.2; mean over the 2 valid pixels.
    loss = task_losses(NYUV2)["normal"](prediction[None, None], target[None, None])
    assert float(loss) == pytest.approx(1.0, rel=1e-12)
    # Identical outputs give 0, and the loss is not 1 - cos (which would be 0.28 here).
    assert float(task_losses(NYUV2)["normal"](target[None, None], target[None, None])) == 0.0


def test_cosine_normal_loss_is_an_option():
    task = Task("normal", 3, "normal", 0.0, loss_name="cosine")
    target = np.array([[0.0, 0.0, 1.0], [0.6, 0.0, 0.8], [0.0, 0.0, 0.0], ODD])
    prediction = np.array([[0.6, 0.0, 0.8], [0.0, 0.6, 0.8], [0.0, 1.0, 0.0], -ODD])
    # Valid: not all zero (a, b, d); cosines 0.8, 0.64, -1.
    assert float(task.loss(prediction[None, None], target[None, None])) == pytest.approx(
        1 - (0.8 + 0.64 - 1.0) / 3, rel=1e-12
    )
    with pytest.raises(ValueError, match="loss_name must be one of"):
        Task("depth", 1, "regression", 0.0, loss_name="cosine")


def test_segmentation_cross_entropy_ignores_minus_one_by_hand():
    logits = np.array(
        [[[2.0, 0.0, -1.0], [0.0, 1.0, 0.0], [5.0, 5.0, 5.0]]]
    )  # (1, 3 pixels, 3 classes)
    labels = np.array([[0, 2, -1]])

    def nll(row, label):
        return -(row[label] - math.log(sum(math.exp(v) for v in row)))

    expected = (nll(logits[0, 0], 0) + nll(logits[0, 1], 2)) / 2  # F.cross_entropy(ignore_index=-1)
    assert float(task_losses(NYUV2)["seg"](logits[:, None], labels[:, None])) == pytest.approx(
        expected, rel=1e-12
    )


def test_depth_and_disparity_l1_over_valid_pixels_by_hand():
    prediction = np.array([1.0, 2.5, 7.0, 0.0]).reshape(1, 1, 4, 1)
    depth = np.array([2.0, 0.0, 4.0, 1.0]).reshape(1, 1, 4, 1)  # 0 invalid: errors 1, -, 3, 1
    assert float(task_losses(NYUV2)["depth"](prediction, depth)) == pytest.approx(5 / 3, rel=1e-12)
    disparity = np.array([2.0, -1.0, 0.0, -1.0]).reshape(
        1, 1, 4, 1
    )  # -1 invalid: errors 1, -, 7, -
    assert float(task_losses(CITYSCAPES)["disp"](prediction, disparity)) == pytest.approx(
        4.0, rel=1e-12
    )
