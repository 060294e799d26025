"""Code: HumanEval, MBPP, MultiPL-E JavaScript and C++ pass@1.

Prompts, stop words and test assembly follow FlowerTune's copy of bigcode-evaluation-harness
(evaluation/code/tasks/*.py): HumanEval continues the stripped function prompt; MBPP continues a
docstring holding the task text and its first test (InCoder style); MultiPL-E continues the
stripped translated prompt and appends the translated tests (C++ tests start with the ``}`` that
closes the function, because ``\\n}`` is a stop word).
"""

from __future__ import annotations

from evaluation.benchmarks.base import Benchmark, DataSource, hub_rows, need, read_jsonl
from evaluation.items import CodeTask

HUMANEVAL_STOP = ("\nclass", "\ndef", "\n#", "\n@", "\nprint", "\nif", "\n```", "<file_sep>")
MBPP_STOP = ("\nclass", "\nassert", '\n"""', "\nprint", "\nif", "\n<|/", "\n```")

HUMANEVAL_FILES = ("humaneval/HumanEval.jsonl.gz", "humaneval/HumanEval.jsonl")
MBPP_FILE = "mbpp/mbpp.jsonl"
MBPP_EVAL_IDS = range(11, 511)  # the MBPP paper's test split: task_id 11-510


def load_humaneval(source: DataSource) -> list[CodeTask]:
    if source.root is not None:
        rows = read_jsonl(source.find("humaneval", *HUMANEVAL_FILES), "humaneval")
    else:
        rows = hub_rows("humaneval", "openai/openai_humaneval", None, "test")
    tasks = []
    for i, r in enumerate(rows):
        need(r, ("task_id", "prompt", "test", "entry_point"), "humaneval", f"row {i + 1}")
        prompt = r["prompt"].strip()
        # The canonical solution continues the unstripped prompt; re-add what strip() removed.
        reference = r["prompt"][len(r["prompt"].rstrip()) :] + r.get("canonical_solution", "")
        tasks.append(
            CodeTask(
                id=r["task_id"],
                language="python",
                prompt=prompt,
                tests="\n" + r["test"] + "\n" + f"check({r['entry_point']})",
                stop_words=HUMANEVAL_STOP,
                reference=reference if r.get("canonical_solution") else None,
            )
        )
    return tasks


def load_mbpp(source: DataSource) -> list[CodeTask]:
    if source.root is not None:
        rows = read_jsonl(source.find("mbpp", MBPP_FILE), "mbpp")
        rows = [r for r in rows if int(r.get("task_id", 0)) in MBPP_EVAL_IDS]
    else:
        rows = hub_rows("mbpp", "google-research-datasets/mbpp", "full", "test")
    tasks = []
    for i, r in enumerate(rows):
        need(r, ("task_id", "text", "test_list"), "mbpp", f"row {i + 1}")
        prompt = f'"""\n{r["text"]}\n{r["test_list"][0]}\n"""\n'
        tasks.append(
            CodeTask(
                id=f"mbpp/{r['task_id']}",
                language="python",
                prompt=prompt,
                tests="\n".join(r["test_list"]),
                stop_words=MBPP_STOP,
                reference=r.get("code"),
            )
        )
    return tasks


def load_multiple(source: DataSource, lang: str) -> list[CodeTask]:
    bench = f"multiple-{lang}"
    if source.root is not None:
        rows = read_jsonl(source.find(bench, f"multipl_e/humaneval-{lang}.jsonl"), bench)
    else:
        rows = hub_rows(bench, "nuprl/MultiPL-E", f"humaneval-{lang}", "test")
    tasks = []
    for i, r in enumerate(rows):
        need(r, ("name", "prompt", "tests", "stop_tokens"), bench, f"row {i + 1}")
        tasks.append(
            CodeTask(
                id=r["name"],
                language="js" if lang == "js" else "cpp",
                prompt=r["prompt"].strip(),
                tests=r["tests"],
                stop_words=(*r["stop_tokens"], "<file_sep>"),
            )
        )
    return tasks


def load_multiple_js(source: DataSource) -> list[CodeTask]:
    return load_multiple(source, "js")


def load_multiple_cpp(source: DataSource) -> list[CodeTask]:
    return load_multiple(source, "cpp")


BENCHMARKS = (
    Benchmark(
        "humaneval",
        "HumanEval",
        "code",
        "code",
        load_humaneval,
        None,
        "openai/openai_humaneval",
        HUMANEVAL_FILES[:1],
    ),
    Benchmark(
        "mbpp", "MBPP", "code", "code", load_mbpp, None, "google-research-datasets/mbpp (full)", (MBPP_FILE,)
    ),
    Benchmark(
        "multiple_js",
        "MultiPL-E (JS)",
        "code",
        "code",
        load_multiple_js,
        None,
        "nuprl/MultiPL-E (humaneval-js)",
        ("multipl_e/humaneval-js.jsonl",),
    ),
    Benchmark(
        "multiple_cpp",
        "MultiPL-E (C++)",
        "code",
        "code",
        load_multiple_cpp,
        None,
        "nuprl/MultiPL-E (humaneval-cpp)",
        ("multipl_e/humaneval-cpp.jsonl",),
    ),
)
