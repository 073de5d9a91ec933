"""Which lm-eval tasks a run may name: the local tasks of an include path are found without
reading lm-eval's registry; a registry name reads it."""

from neon.evaluation.tasks import LOCAL_TASKS, check_tasks, task_manager, write_local_tasks
from tests.data_helpers import sample_documents


def test_local_tasks_index_only_their_folder_and_a_registry_task_reads_the_registry(tmp_path):
    tasks = write_local_tasks(sample_documents(200), tmp_path / "tasks", n=8)
    local = task_manager(tasks, ["neon_cloze", "neon_choice"])
    assert sorted(local.all_tasks) == sorted(LOCAL_TASKS)
    mixed = task_manager(tasks, ["neon_cloze", "lambada_openai"])
    assert {"neon_cloze", "lambada_openai", "hellaswag"} <= set(mixed.all_tasks)
    check_tasks(["neon_cloze", "lambada_openai"], tasks, mixed)
