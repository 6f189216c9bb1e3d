import torch

from retclip_dist.retrieval import recall_at_k


def test_recall_hand_computed():
    img = torch.eye(3)
    txt = torch.tensor([[1.0, 0, 0], [0, 0, 1.0], [0, 1.0, 0]])  # 1 and 2 swapped
    r = recall_at_k(img, txt, ["a", "b", "c"], ks=(1, 2, 3))
    assert abs(r["i2t_r1"] - 1 / 3) < 1e-6
    assert abs(r["t2i_r1"] - 1 / 3) < 1e-6
    assert r["i2t_r3"] == 1.0
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
