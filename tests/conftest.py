import os

import torch
from hypothesis import settings

# The test models are tiny: intra-op threads only add overhead and contention on a 2-core machine.
torch.set_num_threads(1)

# CI runs the same examples every time (derandomized); locally hypothesis explores new ones.
settings.register_profile("ci", derandomize=True, deadline=None, print_blob=True)
if os.environ.get("CI"):
    settings.load_profile("ci")
