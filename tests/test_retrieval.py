import pytest
import torch

from retclip_dist.train.validate import recall_at_k


def test_recall_hand_computed():
    img = torch.eye(3)
    txt = torch.tensor([[1.0, 0, 0], [0, 0, 1.0], [0, 1.0, 0]])  # 1 and 2 swapped
    r = recall_at_k(img, txt, ["a", "b", "c"], ks=(1, 2, 3))
    assert abs(r["i2t_r1"] - 1 / 3) < 1e-6
    assert abs(r["t2i_r1"] - 1 / 3) < 1e-6
    assert abs(r["chance_r1"] - 1 / 3) < 1e-9
    assert abs(r["chance_r2"] - 2 / 3) < 1e-9


def test_identical_reports_are_all_correct():
    img = torch.eye(3)
    txt = torch.tensor([[0, 1.0, 0], [1.0, 0, 0], [0, 0, 1.0]])  # 0 and 1 swapped but share a report
    r = recall_at_k(img, txt, ["normal", "normal", "haemorrhage"], ks=(1,))
    assert r["i2t_r1"] == 1.0
    assert r["t2i_r1"] == 1.0
    # Patients 0 and 1 each have 2 right answers of 3, patient 2 one: (2/3 + 2/3 + 1/3) / 3.
    assert abs(r["chance_r1"] - 5 / 9) < 1e-9


def test_recall_at_k_below_n_counts_the_rank_of_each_own_report():
    # With image features the identity, sim[i, j] = txt[j, i]: each row below is one image's scores over
    # the four texts, all distinct. The own text (diagonal) ranks 1, 2, 4 and 2.
    sim = torch.tensor(
        [
            [0.9, 0.1, 0.5, 0.3],
            [0.8, 0.6, 0.2, 0.1],
            [0.7, 0.5, 0.1, 0.3],
            [0.2, 0.9, 0.4, 0.6],
        ]
    )
    r = recall_at_k(torch.eye(4), sim.T.contiguous(), ["a", "b", "c", "d"], ks=(1, 2, 3))
    assert (r["i2t_r1"], r["i2t_r2"], r["i2t_r3"]) == (0.25, 0.75, 0.75)
    # Text to image reads the columns: the own image ranks 1, 2, 4 and 1.
    assert (r["t2i_r1"], r["t2i_r2"], r["t2i_r3"]) == (0.5, 0.75, 0.75)
    assert (r["chance_r1"], r["chance_r2"], r["chance_r3"]) == pytest.approx((0.25, 0.5, 0.75))
    # Patients 0 and 2 share a report: image 2's top text (0) is now a right answer, and so is text 2's
    # third image (0) for t2i@3.
    shared = recall_at_k(torch.eye(4), sim.T.contiguous(), ["a", "b", "a", "d"], ks=(1, 3))
    assert (shared["i2t_r1"], shared["t2i_r3"]) == (0.5, 1.0)
