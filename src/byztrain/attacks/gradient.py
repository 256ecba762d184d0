"""Attacks that replace the gradient a peer sends."""

from __future__ import annotations

from byztrain.attacks.base import Attack, register


@register
class SignFlip(Attack):
    """Send `scale * g` (default scale -1000, as the BTARD ResNet code's `SignFlipper`).

    Other libraries use -1 (ByzFL, epfml) or -100 (Garfield); set `attack.params.scale` to match them.
    """

    name = "sign_flip"
    defaults = {"scale": -1000.0}

    def check_params(self):
        if not isinstance(self.params["scale"], (int, float)):
            raise self.param_error("scale", f"must be a number, got {self.params['scale']!r}")

    def on_gradient(self, g, ctx):
        return g * float(self.params["scale"])
