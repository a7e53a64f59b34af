import os
import sys
from pathlib import Path

# The tests check what the searches decide, not how fast: short benchmarks (see onnx_cp.api.MEASURE_SECONDS).
os.environ.setdefault("ONNX_CP_MEASURE_SECONDS", "0.05")

# Let tests import the shared model factory as `model_factory`.
sys.path.insert(0, str(Path(__file__).parent))
