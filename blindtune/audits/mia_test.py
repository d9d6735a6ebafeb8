import pytest

from blindtune.audits.mia import membership_inference, roc_auc, tpr_at_fpr


def test_roc_auc_by_ranks():
    assert roc_auc([3, 4, 5], [0, 1, 2]) == 1.0
    assert roc_auc([0, 1, 2], [3, 4, 5]) == 0.0
    assert roc_auc([1, 1], [1, 1]) == 0.5
    assert roc_auc([2, 0], [1]) == 0.5
    assert roc_auc([1, 3], [0, 2]) == pytest.approx(0.75)
    with pytest.raises(ValueError):
        roc_auc([], [1])


def test_tpr_at_low_fpr_uses_only_thresholds_that_keep_false_positives_rare():
    nonmembers = list(range(100))  # scores 0..99
    members = [99.5, 98.5, 50, 10]
    assert tpr_at_fpr(members, nonmembers, 0.01) == 0.5  # 1 non-member (99) may pass: threshold 98
    assert tpr_at_fpr(members, nonmembers, 0.0) == 0.25  # above the top non-member only
    assert tpr_at_fpr(members, nonmembers, 0.5) == 0.75


def test_membership_inference_scores_low_loss_and_low_loss_ratio_as_members():
    members, nonmembers = [0.1, 0.2, 0.3], [1.0, 1.2, 0.9]
    # The reference finds the members just as easy: the ratio attack sees through the "easy" examples.
    reference = ([0.1, 0.2, 0.3], [1.0, 1.2, 0.9])
    result = membership_inference((members, nonmembers), reference)
    assert result["loss"]["auc"] == 1.0 and result["members"] == 3
    assert result["loss_ratio"]["auc"] == 0.5
    assert membership_inference((members, nonmembers), None).keys() >= {"loss", "mean_loss_members"}
