"""Switch off phoning home before Ray, MLflow or Hugging Face libraries are imported.

Imported for its side effect by `scaling_study/__init__.py`. Users can still opt in by
setting the variables themselves; we only fill in defaults.
"""

import os

QUIET_ENV = {
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "DO_NOT_TRACK": "true",
    "RAY_USAGE_STATS_ENABLED": "0",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "TOKENIZERS_PARALLELISM": "false",
    # MLflow prints a "View run at URL" line for every run it ends; a study ends thousands
    "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true",
}

for _key, _value in QUIET_ENV.items():
    os.environ.setdefault(_key, _value)

# The study's offline switch (scaling_study.downloads) covers models too: Hugging Face loads them
# from its cache only.
if os.environ.get("SCALING_STUDY_OFFLINE", "") not in ("", "0"):
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
