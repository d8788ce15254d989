"""Fault injection for the reliability tests: named points in the code fail when the environment asks.

    SCALING_STUDY_FAULT="pretrain-step=8:kill"          SIGKILL this process right after optimizer step 8
    SCALING_STUDY_FAULT="checkpoint-write=20:kill"      SIGKILL while step 20's checkpoint is half written
    SCALING_STUDY_FAULT="checkpoint-write=20:enospc"    raise OSError(ENOSPC) there, as a full disk would
    SCALING_STUDY_FAULT="finetune-log:kill-pid=PATH"    before a finetune run logs its results, kill the
                                                        process group whose pid starts the file PATH (the
                                                        MLflow server's server.pid): tracking lost mid-study
    SCALING_STUDY_FAULT="corpus-checkpoint=0:kill"      SIGKILL a corpus build once its tokenizers are trained and
                                                        saved (=N: once a volume's Nth shard is closed and saved)
    SCALING_STUDY_FAULT="upload=trainer_state.pt:kill"  SIGKILL an upload to an object store before this file
                                                        goes up (here a checkpoint's marker, the last one)
    SCALING_STUDY_FAULT="pretrain-step=7:stall=120"     hold this process here 120 s: a test removes its Ray node
                                                        meanwhile (what is held is what the node loses)
    SCALING_STUDY_FAULT="pretrain-step=7:stall=120;finetune-log:stall=120"   several faults, `;`-separated
    SCALING_STUDY_FAULT_ONCE=/tmp/x/fired               fire only if this file does not exist yet, and create it
                                                        (a restarted worker must not die again at the same step);
                                                        with several faults, each has its own: /tmp/x/fired-<point>

The code calls `faults.point("pretrain-step", step)` where a fault may strike; with the variable
unset that is one dictionary lookup. Ray workers inherit the variables from the process that
started the local Ray (or their node's, in tests/test_cluster_sim.py), so a test sets them before
`ray.init`. This is the one place the project
stands in for reality, and only to make a real failure (a real SIGKILL, a real dead server) happen
at a chosen moment; tests/test_faults.py uses it.
"""

from __future__ import annotations

import errno
import os
import signal
import time

ENV = "SCALING_STUDY_FAULT"
ENV_ONCE = "SCALING_STUDY_FAULT_ONCE"


def _parse(text: str) -> tuple[str, str | None, str, str | None]:
    """`point[=value]:action[=arg]` -> (point, value, action, arg)."""
    where, _, action = text.partition(":")
    point, _, value = where.partition("=")
    action, _, arg = action.partition("=")
    return point.strip(), value.strip() or None, action.strip(), arg.strip() or None


def _claim_once(suffix: str = "") -> bool:
    marker = os.environ.get(ENV_ONCE)
    if not marker:
        return True
    marker += suffix
    try:
        os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        return True
    except FileExistsError:
        return False


def point(name: str, value: object = None) -> None:
    """Strike here if $SCALING_STUDY_FAULT names this point (and value, when it gives one)."""
    text = os.environ.get(ENV)
    if not text:
        return
    faults = [_parse(part) for part in text.split(";") if part.strip()]
    for target, want, action, arg in faults:
        if target != name or (want is not None and want != str(value)):
            continue
        if _claim_once(f"-{target}" if len(faults) > 1 else ""):
            _strike(text, name, value, action, arg)


def _strike(text: str, name: str, value: object, action: str, arg: str | None) -> None:
    if action == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    elif action == "enospc":
        raise OSError(errno.ENOSPC, f"No space left on device (injected at {name}={value})")
    elif action == "kill-pid" and arg:
        with open(arg) as f:
            pid = int(f.read().split()[0])
        os.killpg(pid, signal.SIGKILL)
    elif action == "stall" and arg:
        time.sleep(float(arg))
    else:
        raise ValueError(f"${ENV}={text!r}: unknown action {action!r}; allowed: kill, enospc, kill-pid=PATH, "
                         "stall=SECONDS")
