"""scaling-study: factorial scaling studies of scientific masked language models.

    from scaling_study.spec import load_spec
    from scaling_study.grid import expand
    plan = expand(load_spec("experiments/smoke.yaml"))

See README.md for the command line (`scaling-study plan|...`).
"""

from scaling_study import _env  # noqa: F401  (telemetry off before anything else loads)

__version__ = "0.1.0"
