r"""First-order bilevel methods that move both levels: BOME, PGDO, MESO, ALTO (BOAT's ``fo_ol``).

See :doc:`/baselines` for the equations, costs and the comparison with BOAT.
"""

from .alternating import ALTO
from .base import FirstOrderMethod, StepInfo
from .bome import BOME, bome_direction
from .moreau import MESO, moreau_theta_step
from .penalty import PGDO

#: BOAT 1.1.1's names of these methods (its ``fo_op``) and ours
BOAT_NAMES = {"VFO": BOME, "PGDO": PGDO, "MESO": MESO, "ALTO": ALTO}

__all__ = ["FirstOrderMethod", "StepInfo", "BOME", "PGDO", "MESO", "ALTO", "bome_direction", "moreau_theta_step",
           "BOAT_NAMES"]
