"""How the service's OpenMP threads wait: passively, unless the environment says otherwise.

torch runs a CPU pass's operators on an OpenMP team (``app.pipeline.cpu_share``). When an
operator ends, GNU OpenMP's threads spin, busy on their cores, for a while before they sleep:
the right trade for one program that runs operator after operator, the wrong one for a service
whose decoding, drawing and other passes want those cores between two of a pass's operators and
after its last. With ``OMP_WAIT_POLICY=PASSIVE`` the threads sleep at once. Measured on 2 cores
(``bench/env_ab.py --b OMP_WAIT_POLICY=PASSIVE``, closed-loop GradCAM on a 640x480 JPEG, three
rounds): the same throughput one request at a time (resnet18 1.02x, resnet50 1.00x), more under
load (resnet18 1.04x at concurrency 4 and 1.10x at 16, resnet50 1.07x and 1.17x); a loop of
256x256 products between 2 ms sleeps kept 1.17 cores busy by default and 0.33 passive.

OpenMP reads the variable once, when torch's library loads, so ``prefer_passive_waits`` runs
before anything imports torch: first thing in ``python -m app`` (and its workers, which are
``python -m app`` too). An operator who wants another policy sets ``OMP_WAIT_POLICY`` (or
``GOMP_SPINCOUNT``) in the environment, and it is kept.
"""

from __future__ import annotations

import os
import sys
from collections.abc import MutableMapping

WAIT_POLICY = "OMP_WAIT_POLICY"


def prefer_passive_waits(environ: MutableMapping[str, str] = os.environ) -> bool:
    """Set ``OMP_WAIT_POLICY=PASSIVE`` unless the environment sets a policy; whether the
    policy in effect will be the environment's (False: torch was imported before, too late)."""
    environ.setdefault(WAIT_POLICY, "PASSIVE")
    return "torch" not in sys.modules
