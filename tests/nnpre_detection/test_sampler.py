"""Hard-negative sampler invariants (nnDetection numbers)."""
import torch

from nnpre_detection.sampler import HardNegativeSampler


def make_batch(n_images, n_anchors, n_pos, gen):
    labels, probs = [], []
    for _ in range(n_images):
        lab = torch.zeros(n_anchors, dtype=torch.long)
        lab[torch.randperm(n_anchors, generator=gen)[:n_pos]] = 1
        labels.append(lab)
        probs.append(torch.rand(n_anchors, generator=gen))
    return labels, probs


def test_counts_follow_nndetection_formulas():
    gen = torch.Generator().manual_seed(0)
    labels, probs = make_batch(4, 2000, 30, gen)  # 120 positives in the batch
    labels[1][:5] = -1  # ignored anchors are never sampled
    pos, neg = HardNegativeSampler()(labels, probs, torch.Generator().manual_seed(1))
    num_pos = sum(int(p.sum()) for p in pos)
    num_neg = sum(int(n.sum()) for n in neg)
    assert num_pos == int(32 * 4 * 0.33) == 42
    assert num_neg == int(42 * abs(1 - 1 / 0.33)) == 85
    for lab, p, n in zip(labels, pos, neg):
        assert p.shape == n.shape == lab.shape
        assert (lab[p] >= 1).all() and (lab[n] == 0).all() and not (p & n).any()


def test_negatives_come_from_the_hard_pool():
    gen = torch.Generator().manual_seed(2)
    labels, probs = make_batch(2, 5000, 3, gen)
    sampler = HardNegativeSampler(pool_size=2)
    pos, neg = sampler(labels, probs, torch.Generator().manual_seed(3))
    num_pos = sum(int(p.sum()) for p in pos)
    assert num_pos == 6
    num_neg = int(6 * abs(1 - 1 / 0.33))
    all_lab, all_prob = torch.cat(labels), torch.cat(probs)
    neg_probs = all_prob[all_lab == 0]
    pool_floor = neg_probs.topk(num_neg * 2).values.min()
    sampled = all_prob[torch.cat(neg)]
    assert sampled.numel() == num_neg and (sampled >= pool_floor).all()
    # pool_size 1: exactly the hardest negatives
    _, neg1 = HardNegativeSampler(pool_size=1)(labels, probs, torch.Generator().manual_seed(3))
    assert torch.equal(all_prob[torch.cat(neg1)].sort().values, neg_probs.topk(num_neg).values.sort().values)


def test_no_positives_and_determinism():
    gen = torch.Generator().manual_seed(4)
    labels, probs = make_batch(2, 300, 0, gen)
    pos, neg = HardNegativeSampler()(labels, probs, torch.Generator().manual_seed(0))
    assert sum(int(p.sum()) for p in pos) == 0
    assert sum(int(n.sum()) for n in neg) == int(1 * abs(1 - 1 / 0.33))  # max(1, num_pos) positives assumed
    labels, probs = make_batch(3, 1000, 40, gen)
    a = HardNegativeSampler()(labels, probs, torch.Generator().manual_seed(5))
    b = HardNegativeSampler()(labels, probs, torch.Generator().manual_seed(5))
    c = HardNegativeSampler()(labels, probs, torch.Generator().manual_seed(6))
    assert all(torch.equal(x, y) for x, y in zip(a[0] + a[1], b[0] + b[1]))
    assert not all(torch.equal(x, y) for x, y in zip(a[0] + a[1], c[0] + c[1]))
