"""The one k-means (models/kmeans.py): groups, padding, seeds and small groups."""

from __future__ import annotations

import torch

from models.kmeans import kmeans


def test_groups_are_independent_of_each_other_and_of_padding():
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(30, 2, generator=g), torch.randn(20, 2, generator=g) + 5
    padded = torch.zeros(2, 30, 2)
    padded[0], padded[1, :20], padded[1, 20:] = a, b, 1e6  # the padding would pull a centre far away
    seeds = torch.tensor([7, 11])
    assign, centres, counts = kmeans(padded, 3, lengths=torch.tensor([30, 20]), seeds=seeds)
    alone = kmeans(b, 3, seeds=seeds[1:])
    assert torch.equal(centres[1], alone[1]) and torch.equal(assign[1, :20], alone[0])
    assert assign[1, 20:].eq(0).all() and counts.sum(1).tolist() == [30.0, 20.0]
    for i, x in enumerate((a, b)):  # a centre is the mean of its cluster
        n = len(x)
        for c in range(3):
            members = x[assign[i, :n] == c]
            assert torch.allclose(centres[i, c], members.mean(0), atol=1e-6)


def test_same_generator_same_clusters_and_a_group_smaller_than_k():
    x = torch.randn(40, 4, generator=torch.Generator().manual_seed(0))
    one = kmeans(x, 5, gen=torch.Generator().manual_seed(3))
    two = kmeans(x, 5, gen=torch.Generator().manual_seed(3))
    assert all(torch.equal(p, q) for p, q in zip(one, two))
    assign, centres, counts = kmeans(torch.tensor([[0.0, 1.0], [1.0, 0.0]]), 3)
    assert centres.tolist() == [[0.0, 1.0], [1.0, 0.0], [0.0, 1.0]] and counts.tolist() == [1.0, 1.0, 0.0]
    assert assign.tolist() == [0, 1]
