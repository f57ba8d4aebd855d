import sys
from pathlib import Path

# tests/tiny_models.py is a helper module shared by the test packages
sys.path.insert(0, str(Path(__file__).resolve().parent))
