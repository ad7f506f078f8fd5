"""train_dpo.py under torchrun, instrumented for tests/test_distributed.py.

    python -m torch.distributed.run --nproc_per_node 2 tests/dist_entry.py [train_dpo flags]

Each rank appends JSON lines to $DPO_TEST_RECORD: one per reference scoring (with how many of the
model's parameter elements this rank held then, against the model's full size) and one per cache
file written.

DPO_TEST_ENGINE_ON_CPU=1: accelerate 1.15 turns an FSDP or DeepSpeed launch into FSDP or DeepSpeed
only on accelerator devices (on CPU processes its state stays plain multi-CPU DDP). This shim reports
gloo on CPU as a multi-device backend, so accelerate's own FSDP2 and DeepSpeed code paths (and
torch's and DeepSpeed's sharding) run unchanged on CPU processes. Test-only: nothing else changes.
"""

import json
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import torch  # noqa: E402
from accelerate.state import PartialState  # noqa: E402
from accelerate.utils import DistributedType  # noqa: E402

if os.environ.get("DPO_TEST_ENGINE_ON_CPU") == "1":
    def _prepare_backend(self, cpu=False, sagemaker_dp=False, backend=None):
        return "gloo", DistributedType.MULTI_GPU

    def _set_device(self):
        self.device = torch.device("cpu")

    PartialState._prepare_backend = _prepare_backend
    PartialState.set_device = _set_device

import train_dpo  # noqa: E402
from utils import reference  # noqa: E402
from utils.cli import run_script  # noqa: E402


def record(**event) -> None:
    with open(os.environ["DPO_TEST_RECORD"], "a") as f:
        f.write(json.dumps({"rank": int(os.environ.get("RANK", 0)), **event}) + "\n")


def held_and_full(parameter) -> tuple[int, int]:
    """Elements of `parameter` this rank holds, and in the whole parameter (FSDP2 DTensor, ZeRO-3 or plain)."""
    if hasattr(parameter, "ds_numel"):  # ZeRO-3: the full tensor is gathered only inside its module's forward
        return parameter.ds_tensor.numel(), parameter.ds_numel
    if hasattr(parameter, "to_local"):  # FSDP2: a DTensor sharded over the ranks
        return parameter.to_local().numel(), parameter.numel()
    return parameter.numel(), parameter.numel()


score_dataset, save_file = reference.score_dataset, reference.save_file


def recording_score_dataset(model, dataset, *args, unwrapped=None, **kwargs):
    sizes = [held_and_full(p) for p in (unwrapped or model).parameters()]
    record(event="score", rows=len(dataset), held=sum(h for h, _ in sizes), full=sum(f for _, f in sizes))
    return score_dataset(model, dataset, *args, unwrapped=unwrapped, **kwargs)


def recording_save_file(tensors, path, *args, **kwargs):
    record(event="write", rows=len(next(iter(tensors.values()))))
    return save_file(tensors, path, *args, **kwargs)


reference.score_dataset, reference.save_file = recording_score_dataset, recording_save_file

if os.environ.get("DPO_TEST_RECORD_DATA") == "1":  # who tokenises, and what each rank's splits hold
    from utils import data, dry_run  # noqa: E402

    tokenize_row, load_preference_data = data.tokenize_row, data.load_preference_data

    def recording_tokenize_row(row, *args, **kwargs):
        record(event="tokenise", row=row["row_index"])
        return tokenize_row(row, *args, **kwargs)

    def recording_load_preference_data(*args, **kwargs):
        dataset = load_preference_data(*args, **kwargs)
        for split, rows in dataset.items():
            record(event="split", split=split, rows=rows.to_dict(),
                   cache_files=sorted(file["filename"] for file in rows.cache_files))
        return dataset

    data.tokenize_row = recording_tokenize_row
    dry_run.load_preference_data = recording_load_preference_data

if os.environ.get("DPO_TEST_NAN_RANK"):  # this rank's loss turns NaN on its first micro-batch of step 2
    compute_loss = train_dpo.DPOTrainer.compute_loss

    def nan_compute_loss(self, model, inputs, *args, **kwargs):
        loss = compute_loss(self, model, inputs, *args, **kwargs)
        bad = (model.training and self.state.global_step == 1 and not self._step_losses
               and os.environ["RANK"] == os.environ["DPO_TEST_NAN_RANK"])
        return loss * float("nan") if bad else loss

    train_dpo.DPOTrainer.compute_loss = nan_compute_loss

if __name__ == "__main__":
    try:
        run_script(train_dpo.main)  # as `python train_dpo.py` runs: errors end in one line and a status
        status = 0
    except SystemExit as exit:
        status = exit.code
    # torch 2.13's gloo process group can abort ("terminate called without an active exception") or
    # deadlock (its destructor joins a worker thread that waits for the GIL) while the interpreter tears
    # down; the run is complete and saved here, so leave without tearing down.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)
