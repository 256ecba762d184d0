"""Data-poisoning attacks (`on_batch`): the attacker computes an honest gradient on poisoned labels and sends it."""

from __future__ import annotations

import torch

from byztrain.attacks._util import generator
from byztrain.attacks.base import Attack, register


@register
class LabelFlip(Attack):
    """Train on labels `C - 1 - y` (C = number of classes of the task; 9 - y on the 10-class tasks).

    The same map as the BTARD ResNet code's `LabelFlipper` (cross-entropy against 9 - y), ByzFL's
    `LabelFlipping` client flag ((nb_labels - 1) - y), Blades and epfml. Not the ALBERT fork's variant
    ((label + 1) mod vocab for MLM). Inputs are unchanged; the gradient is then sent as is.
    """

    name = "label_flip"
    reference = "BTARD code LabelFlipper; ByzFL, Blades"

    def on_batch(self, x, y, ctx):
        return x, (ctx.num_classes - 1) - y


@register
class LabelShuffle(Attack):
    """Train on a random permutation of the batch's labels: y[perm], perm new at every step.

    perm is uniform over permutations of the batch (`torch.randperm`), drawn from a generator seeded by
    (run seed, step, peer): reproducible, independent across attackers and steps. The label multiset of the
    batch is unchanged (so class-frequency checks see nothing); the image/label pairing is destroyed. A
    permutation may fix some samples (and with a tiny batch could be the identity); it is not forced to be a
    derangement. Not in the BTARD paper; the "label shuffling" data attack of the heterogeneity literature.
    """

    name = "label_shuffle"
    reference = "heterogeneity literature"

    def on_batch(self, x, y, ctx):
        perm = torch.randperm(y.shape[0], generator=generator(ctx.run_seed, "label_shuffle", ctx.step, ctx.peer))
        return x, y[perm.to(y.device)]
