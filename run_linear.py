"""Linear probe on frozen features: not built yet (issue 5).

This placeholder exits with an error instead of pretending to evaluate.
"""

import sys

if __name__ == "__main__":
  sys.exit("run_linear.py: the linear probe is not implemented yet (see README, Status).")
