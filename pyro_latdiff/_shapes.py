"""Broadcasting of shapes on the hot path of an SVI step.

``torch.broadcast_shapes`` goes through torch's symbolic-shape reference code (about
75 us a call on CPU); an SVI step of the guide broadcasts shapes about 15 times, so
the package uses Pyro's plain ``broadcast_shape`` (about 2 us) and returns a
``torch.Size`` as torch does.
"""

from __future__ import annotations

import torch
from pyro.distributions.util import broadcast_shape


def broadcast_shapes(*shapes) -> torch.Size:
    """The broadcast shape of ``shapes`` (sequences of ints), as ``torch.broadcast_shapes``;
    incompatible shapes raise ``ValueError``."""
    return torch.Size(broadcast_shape(*shapes))
