"""The Tune search algorithm of a study's finetuning: hands out finetune runs whose model is ready.

    searcher = ReadyFinetunes(seeds, seeds.release(), readiness, make_config, state, slots)
    tune.Tuner(trainable, tune_config=tune.TuneConfig(search_alg=searcher, ...)).fit()

`orchestration.Scheduler.release_finetunes` builds it: `readiness` says whether a run's model
exists yet, `make_config` turns a pack of runs into a trial's config (`workers.finetune_trial`),
`slots` how many trials to run now, `seeds` (`adaptive.StudySeeds`) which runs to start.
"""

from __future__ import annotations

from collections.abc import Callable

from ray.tune.search import Searcher

from scaling_study.adaptive import StudySeeds
from scaling_study.grid import Node
from scaling_study.studystate import StudyState
from scaling_study.workers import failure_reason


class ReadyFinetunes(Searcher):
    """A Ray Tune search algorithm that hands out finetune runs whose model is ready.

    `suggest` returns a trial config as soon as some released run's checkpoint exists, `None` while
    pretraining is still producing them or trials whose results may release more are running, and
    FINISHED when nothing is left to hand out. A trial packs runs of one model (tasks, seeds, epoch
    levels; a task's runs one after the other): a share of the ready runs per slot (`slots`: the
    trials to run now, `Scheduler.trial_slots`), so that one process loads the checkpoint once and
    encodes each task once, while every slot still gets work. At most `slots` trials are handed out
    at once; without `max_concurrent`, twice that (pending trials are demand an autoscaler sees)
    once no corpus build or pretraining run waits (`reserved`): a pending trial would take the CPUs
    they free.
    Each run a trial reports (`on_trial_result`) goes to the study's seeds (`adaptive.StudySeeds`),
    which may release more.
    """

    def __init__(self, seeds: StudySeeds, first: list[Node], readiness: Callable[[Node], bool | None],
                 make_config: Callable[[list[Node]], dict], state: StudyState,
                 slots: Callable[[], int] = lambda: 1, *, fixed: bool = False,
                 reserved: Callable[[], bool] = lambda: False):
        super().__init__(metric="test_f1", mode="max")
        self.seeds, self.pending, self.readiness, self.make_config = seeds, list(first), readiness, make_config
        self.st, self.slots, self.fixed, self.reserved = state, slots, fixed, reserved
        self.trials: dict[str, list[Node]] = {}
        self.live: set[str] = set()
        self.outcome: dict[str, str] = {}  # run id -> "" (done) or why it failed

    def suggest(self, trial_id: str):
        slots, reserved = self.slots(), self.reserved()
        # without max_concurrent, twice what fits now: an autoscaler sees demand and grows the cluster;
        # but not while builds or pretraining runs still wait: a pending trial would take the CPUs they free
        if len(self.live) >= (slots if self.fixed or reserved else 2 * slots):
            return None
        ready, known = [], {}
        for node in list(self.pending):
            model = node.parents[0]
            if model not in known:  # one readiness check per model: its runs share it
                known[model] = self.readiness(node)
            if known[model] is None:
                self.pending.remove(node)
                self._ended(node, failed=True)
            elif known[model]:
                ready.append(node)
        if ready:
            first, size = ready[0], -(-len(ready) // max(1, slots))
            # one model's runs, a task's runs together: the trial loads the model once and encodes each task once
            pack = sorted((n for n in ready if n.parents[0] == first.parents[0]), key=lambda n: n.factors["task"])
            pack = pack[:size]
            for node in pack:
                self.pending.remove(node)
            try:
                config = self.make_config(pack)
            except Exception as exc:  # tracking lost: these cells fail, a re-run redoes them
                for node in pack:
                    for cell in self.st.plan.children(node.id):
                        self.st.fail(cell, failure_reason(exc), None)
                    self._ended(node, failed=True)
                return None
            self.trials[trial_id] = pack
            self.live.add(trial_id)
            for node in pack:
                for cell in self.st.plan.children(node.id):
                    self.st.set(cell.id, "running")
            return config
        if not self.pending and not self.live:
            self.pending += self.seeds.release()
            return self.suggest(trial_id) if self.pending else Searcher.FINISHED
        return None

    def _ended(self, node: Node, *, failed: bool) -> None:
        if failed:
            self.seeds.failed(node)
        else:
            self.seeds.finished(node)
        self.pending += self.seeds.release()

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        node = next((n for n in self.trials.get(trial_id, []) if n.id == result.get("node")), None)
        if node is None or node.id in self.outcome:  # a retried trial reports its finished runs again
            return
        reason = result.get("failure") or ""
        self.outcome[node.id] = reason
        for cell in self.st.plan.children(node.id):
            self.st.set(cell.id, "failed" if reason else "done")
        self._ended(node, failed=bool(reason))

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        self.live.discard(trial_id)
        if result and not error:
            self.on_trial_result(trial_id, result)
        for node in self.trials.get(trial_id, []):
            if node.id not in self.outcome:  # its process died, or the trial ended before it
                for cell in self.st.plan.children(node.id):
                    self.st.set(cell.id, "failed")
                self._ended(node, failed=True)

    def __getstate__(self) -> dict:
        # Tune pickles its search algorithm for Tuner.restore, which we never use (storage says
        # what is done); the driver-side callbacks and locks do not pickle.
        return {"pending": [n.id for n in self.pending], "trials": {k: [n.id for n in v] for k, v in self.trials.items()}}

    def save(self, checkpoint_path: str) -> None:  # nothing to save: storage says what is done
        pass

    def restore(self, checkpoint_path: str) -> None:
        pass
