"""Whether an artifact may ship: parity with FP32 (output roles, near ties), the user's metric, what
every artifact is compared with, and the recovery ladder for one that misses."""
