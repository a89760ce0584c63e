import torch

# The test models are tiny: intra-op threads only add overhead and contention on a 2-core machine.
torch.set_num_threads(1)
