"""Running lm-eval tasks on a NeonLM, and the small local tasks the demo and the tests use.

Tasks come from lm-eval's registry (`hellaswag`, `lambada_openai`, `arc_easy`, ...: their datasets
download from the Hugging Face hub) or from a folder of task YAMLs in lm-eval's own format
(`include_path`), whose datasets may be local JSONL files. `write_local_tasks` writes three such
tasks over a list of documents, one per kind of request:

- `neon_cloze`: the last word of a sentence after the rest (loglikelihood: acc, perplexity;
  lambada_openai's format);
- `neon_choice`: that last word among four (multiple_choice: acc, acc_norm; lm-eval puts the
  space before each choice);
- `neon_generate`: the next word, generated greedily (generate_until: exact_match).
"""

from __future__ import annotations

import json
import logging
import random
import re
from pathlib import Path
from typing import Optional

from neon.errors import ConfigError

LOCAL_TASKS = ("neon_cloze", "neon_choice", "neon_generate")


def task_manager(include_path: Optional[str] = None, tasks: Optional[list[str]] = None):
    """lm-eval's TaskManager. When every one of `tasks` is a plain task (not a group or tag) of
    `include_path`, only that folder is indexed: lm-eval's own registry (about 15,000 YAMLs, some
    seconds per process) is read only when a task may come from it."""
    from lm_eval.tasks import TaskManager

    if include_path and tasks:
        local = TaskManager(include_path=str(include_path), include_defaults=False, verbosity="ERROR")
        if set(tasks) <= set(local.all_subtasks):
            return local
    return TaskManager(include_path=str(include_path) if include_path else None, verbosity="ERROR")


def check_tasks(tasks: list[str], include_path: Optional[str] = None, manager=None) -> None:
    """ConfigError naming the first task lm-eval does not know (before a run spends time)."""
    manager = manager or task_manager(include_path, tasks)
    known = set(manager.all_tasks)
    unknown = [t for t in tasks if t not in known]
    if unknown:
        where = f"lm-eval's registry or {include_path}" if include_path else "lm-eval's registry"
        raise ConfigError(f"--eval-tasks: {unknown[0]!r} is not a task in {where}. Fix: give a task name that "
                          f"`lm_eval ls tasks` lists, or the folder of your task YAMLs with --eval-tasks-include-path.")


def run_tasks(lm, tasks: list[str], *, include_path: Optional[str] = None, limit: Optional[int] = None,
              num_fewshot: Optional[int] = None, log_samples: bool = False, manager=None) -> dict:
    """{"metrics": {task: {metric: value}}, "samples": lm-eval's per-document records (log_samples)}.

    lm-eval aggregates only in the process with LOCAL_RANK 0 (every process of a run calls this
    with the same requests); elsewhere both are empty."""
    import lm_eval

    logging.getLogger("lm_eval").setLevel(logging.ERROR)
    manager = manager or task_manager(include_path, tasks)
    check_tasks(tasks, include_path, manager)
    # the seeds lm-eval would set are None: a run's own RNG states (dropout, router noise) stay as they are
    out = lm_eval.simple_evaluate(model=lm, tasks=list(tasks), task_manager=manager, limit=limit,
                                  num_fewshot=num_fewshot, log_samples=log_samples, bootstrap_iters=0,
                                  verbosity="ERROR", random_seed=None, numpy_random_seed=None,
                                  torch_random_seed=None)
    if out is None:
        return {"metrics": {}, "samples": {}}
    metrics = {}
    for task, values in out["results"].items():
        metrics[task] = {key.split(",")[0]: value for key, value in values.items()
                         if "," in key and "_stderr" not in key and isinstance(value, (int, float))}
    return {"metrics": metrics, "samples": out.get("samples", {})}


def _sentences(documents: list[str]) -> list[list[str]]:
    """Sentences of 6 to 30 words whose last word is a plain word, as word lists."""
    out = []
    for doc in documents:
        for sentence in re.split(r"(?<=[.!?])\s+", " ".join(doc.split())):
            words = sentence.rstrip(".!?").split(" ")
            if 6 <= len(words) <= 30 and re.fullmatch(r"[A-Za-z]{3,}", words[-1]):
                out.append(words)
    return out


def write_local_tasks(documents: list[str], out_dir: str | Path, n: int = 64, seed: int = 0) -> Path:
    """The three LOCAL_TASKS over sentences of `documents` (n documents each), as task YAMLs and
    JSONL files in `out_dir`; pass `out_dir` as include_path. Deterministic for the same inputs."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    sentences = _sentences(documents)
    if len(sentences) < 4:
        raise ConfigError(f"the documents have {len(sentences)} usable sentences; the local tasks need at least 4")
    rng = random.Random(seed)
    picked = rng.sample(sentences, min(n, len(sentences)))
    last_words = sorted({s[-1] for s in sentences})
    records = []
    for words in picked:
        target = words[-1]
        wrong = rng.sample([w for w in last_words if w != target], 3) if len(last_words) > 3 else []
        choices = [target, *wrong]
        rng.shuffle(choices)
        records.append({"context": " ".join(words[:-1]), "target": target, "choices": choices,
                        "label": choices.index(target)})
    data = out_dir / "neon_local_tasks.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    common = {"dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(data.resolve())}},
              "test_split": "test", "doc_to_text": "{{context}}", "metadata": {"version": 1.0}}
    tasks = {
        "neon_cloze": {"output_type": "loglikelihood", "doc_to_target": "{{' ' + target}}",
                       "metric_list": [{"metric": "perplexity", "aggregation": "perplexity",
                                        "higher_is_better": False},
                                       {"metric": "acc", "aggregation": "mean", "higher_is_better": True}]},
        "neon_choice": {"output_type": "multiple_choice", "doc_to_choice": "{{choices}}", "doc_to_target": "{{label}}",
                        "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True},
                                        {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True}]},
        "neon_generate": {"output_type": "generate_until", "doc_to_target": "{{target}}",
                          "generation_kwargs": {"until": ["\n", "."], "max_gen_toks": 8, "do_sample": False},
                          "filter_list": [{"name": "none", "filter": [{"function": "remove_whitespace"},
                                                                      {"function": "take_first"}]}],
                          "metric_list": [{"metric": "exact_match", "aggregation": "mean",
                                           "higher_is_better": True}]},
    }
    for name, spec in tasks.items():
        (out_dir / f"{name}.yaml").write_text(json.dumps({"task": name, **common, **spec}, indent=1) + "\n")
    return out_dir
