import sys
from pathlib import Path

# Let tests import the shared model factory as `model_factory`.
sys.path.insert(0, str(Path(__file__).parent))
