"""ASHA that lets a trial finish its last epoch (imported only when a campaign runs: needs Ray)."""

from __future__ import annotations

from ray.tune.schedulers import ASHAScheduler, TrialScheduler


class FinishLastEpochASHA(ASHAScheduler):
    """ASHA early stopping on the validation metric, except on a trial's final report.

    ASHA stops a trial when it reaches ``max_t`` (and at the top rung). Acting on the final
    epoch's report would kill the trial process while its trainer tears down, before it exports
    its weights and closes its MLflow run; there is nothing left to save by stopping it then, so
    the trial is allowed to end by itself.
    """

    def on_trial_result(self, tune_controller, trial, result):
        action = super().on_trial_result(tune_controller, trial, result)
        if action == TrialScheduler.STOP and result.get(self._time_attr, 0) >= self._max_t:
            return TrialScheduler.CONTINUE
        return action
