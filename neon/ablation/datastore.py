"""The training split's datastore: what an overlay names as `${NEON_TRAIN_DATASTORE}`.

An IO variant that reads a store of the run's own training text (kNN-LM's datastore, RETRO's
retrieval database) names it in an IO function entry, e.g. examples/ablations/datastore_context.yaml:

    - name=datastore,kind=store,source=${NEON_TRAIN_DATASTORE},bank=global,query=context,topk=4,exclude=1

Where the environment does not set NEON_TRAIN_DATASTORE, the ablation builds the store once, in
<work-dir>/datastore, with tools/build_flaming_store.py from the base config's training data
only: the training split of a single --data-path prefix (cut by --split exactly as megatron cuts
it) or a single --train-data-path prefix. No validation or test document is in it. Every position
of a training document is one entry (key: the 4-gram code of the ids up to it; value: the next
id), searched through an IVF-Flat index, with the fingerprint of the PASSAGE_IDS ids up to it, so
that a function with exclude=1 skips a training token's own position (neon/io/store.py). A rerun
reuses the store when it was built from the same data; another work directory starts a new one.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from neon.errors import AblationError

VARIABLE = "NEON_TRAIN_DATASTORE"
BUILDER = Path(__file__).resolve().parents[2] / "tools" / "build_flaming_store.py"
SOURCE = "ablation_source.json"  # what the store was built from, next to its meta.json
INDEX = ("--index", "ivf_flat")  # exact search of every training position per step would dominate the step
PASSAGE_IDS = 8  # exclude=1 needs flaming_io_context_window >= this


def source_of(data) -> dict:
    """The single prefix and split the training split comes from (AblationError otherwise)."""
    if data.train_data_path:
        prefixes, split = data.train_data_path, None
        flag = "--train-data-path"
    else:
        prefixes, split = data.data_path, str(data.split)
        flag = "--data-path"
    if len(prefixes) != 1:
        raise AblationError(f"{flag}={' '.join(map(str, prefixes))}: ${{{VARIABLE}}} is built from one .bin/.idx "
                            f"prefix, not a blend. Fix: build the store of your training data yourself with "
                            f"tools/build_flaming_store.py and export {VARIABLE}=<its directory>.")
    prefix = Path(str(prefixes[0])).resolve()
    return {"input": str(prefix), "split": split, "tokenizer_model": str(data.tokenizer_model)}


def build(data, out: Path, log: str = "[ablate]") -> Path:
    """The store of the training split of `data` (the resolved config's data section) in `out`."""
    from neon.data.tokenizer import tokenizer_vocab_size

    source = source_of(data)
    if (out / "meta.json").is_file():
        recorded = json.loads((out / SOURCE).read_text()) if (out / SOURCE).is_file() else None
        if recorded == source:
            print(f"{log} training-split datastore: {out} (built before)", flush=True)
            return out
        raise AblationError(f"{out} holds a datastore built from {recorded}, not from {source}. Fix: use another "
                            f"--work-dir, or remove {out} to build it again.")
    if out.exists():  # an interrupted build: meta.json is written last
        import shutil

        shutil.rmtree(out)
    out.mkdir(parents=True)
    (out / SOURCE).write_text(json.dumps(source, indent=1))
    split = ["--split", source["split"], "--split-name", "train"] if source["split"] else []
    command = [sys.executable, str(BUILDER), "--input", source["input"], *split, "--output", str(out),
               "--vocab-size", str(tokenizer_vocab_size(source["tokenizer_model"])), *INDEX,
               "--passage-ids", str(PASSAGE_IDS)]
    print(f"{log} building the training-split datastore: {' '.join(command[1:])}", flush=True)
    result = subprocess.run(command)
    if result.returncode != 0:
        raise AblationError(f"building the training-split datastore failed (status {result.returncode}, above). "
                            f"Fix: see the message of tools/build_flaming_store.py above.")
    return out
