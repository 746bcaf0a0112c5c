"""Entry point of Nexa's ML runners: `python run.py <uses>`.

The worker runs this with the job's variables: NEXA_PARAMS (the step's params as JSON,
with its backend), NEXA_IN_<NAME> (each staged input, read-only), NEXA_OUT (the output
folder to fill), NEXA_TMP (scratch), CUDA_VISIBLE_DEVICES (the GPUs leased to the job).
Everything written under NEXA_OUT is hashed, signed and sealed by Nexa afterwards.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.dont_write_bytecode = True  # the driver folder is a read-only, hashed input

import common  # noqa: E402


def main() -> None:
    if len(sys.argv) != 2:
        common.fail("usage: run.py <runners.train|runners.eval|runners.infer|runners.serve>")
    uses = sys.argv[1]
    job = common.Job.from_env()
    if uses == "runners.train" and job.get("backend") == "axolotl":
        import train_axolotl as mod
    elif uses == "runners.train":
        import train_hf as mod
    elif uses == "runners.eval":
        import evaluate as mod
    elif uses == "runners.infer":
        import infer as mod
    elif uses == "runners.serve":
        import serve as mod
    else:
        common.fail(f"this driver does not run {uses!r}")
    mod.main(job)


if __name__ == "__main__":
    try:
        main()
    except common.RunnerError as e:
        common.fail(str(e))
