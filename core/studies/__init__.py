"""Measured studies: each ``python -m core.studies.<name>`` writes ``docs/results/<name>.{json,md}``.

- ``base``: quality of a base model (face detection, Frechet distance, prompt sensitivity);
- ``finetune``: does the default LoRA draw its person (utility over victims);
- ``attack``: the attacker against its baselines over victims;
- ``layers``: busiest vs laziest vs random layers over victims;
- ``watermark``: robustness of AIAO and the backdoor to downstream fine-tunes;
- ``defenses``: the privacy-utility curve of every defense;
- ``cloaking``: clean vs cloaked vs cloaked-then-purified photos, against the LoRA and the attack;
- ``membership``: ROC AUC of membership inference on victims, and the app's calibrated threshold.
"""


def measured_elsewhere(report: dict | None, base: str | None, command: str) -> str:
    """A sentence for a report that was measured on another base model than ``base`` (the running
    model's ``core.model.prior.base_fingerprint``), or "" when it was measured on this one (or when
    there is no report or no base to compare with). Reports record their base as ``"base"``."""
    if not report or base is None or report.get("base") == base:
        return ""
    was = report.get("base")
    which = f"base model `{was}`" if was else "an earlier base model (the report does not record which)"
    return (
        f"*Measured on {which}, not on the one this app runs (`{base}`): the numbers below are that model's "
        f"until `{command}` is run on this one.*"
    )
