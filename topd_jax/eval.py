"""Command line: math benchmark accuracy, avg@k and pass@k of a checkpoint (TOPD.md, section 7).

    python -m topd_jax.eval --checkpoint RUN_DIR_OR_HF_DIR --datasets aime24,aime25,math500,amc23
        [--config CONFIG.yaml] [--samples k] [--temperature T] [--max-new-tokens N] [--limit n]
        [--data-dir DIR] [--out DIR] [key=value ...]

--checkpoint is a Hugging Face directory (config.json + safetensors, tokenizer files) or a training
run's output_dir (with checkpoints/), whose newest readable checkpoint is exported to a temporary
Hugging Face directory first. The tokenizer is --tokenizer, else the directory's own tokenizer
files (export writes the student.path's, or the synthetic task's for a data.source=synthetic
run), else the config's student.path; a random-model run on random prompts has none.
The config (--config, else the run's config.yaml, else defaults, then key=value overrides) gives
the dtype (student.dtype), the system prompt (data.system_prompt), extra EOS ids
(rollout.eos_ids) and the default --max-new-tokens (rollout.max_new_tokens).

Protocol: each problem is the user message of the chat template followed by INSTRUCTION (final
answer in \\boxed{}; a tokenizer without a chat template, as base models often have, gets the
plain text instead, with a one-line warning, and results.json records `"chat": false`); k
completions are sampled per problem; each is graded by the last \\boxed{} with math-verify
(topd_jax.grading). Reported per dataset: accuracy (the first sample of each problem; greedy at
temperature 0, as the paper reports), avg@k, pass@k, counts, the skipped-record summary (also a
warning line before generating: n counts only the usable records). Writes OUT/results.json,
OUT/results.md (the printed Markdown table) and OUT/<dataset>.samples.jsonl (each problem's
completions, extracted answers and grades).

Every requested dataset is read and checked before any generation, and results.json is rewritten
after each dataset (`"complete": false` until the last), so a bad file fails at once and an
interrupted evaluation keeps the datasets that finished. Errors are one line, exit 2 (--debug:
the traceback); see docs/faults.md.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from typing import Any, Sequence

import numpy as np

from topd_jax import grading
from topd_jax.configuration import ConfigError
from topd_jax.data import math_sets
from topd_jax.errors import ArgumentParser, exit_quietly, run_cli
from topd_jax.fileio import check_writable, write_file

INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."
DEFAULT_DATASETS = "aime24,aime25,math500,amc23"


def generate_completions(model, tokenizer, problems: Sequence[str], *, samples: int, temperature: float,
                         top_p: float, max_new_tokens: int, batch_size: int, seed: int, system: str | None,
                         instruction: str, eos_ids: Sequence[int],
                         chat: bool = True) -> tuple[list[list[str]], list[list[bool]]]:
    """Completion texts [P][k] and whether each ended with an EOS [P][k].

    Prompts: encode_prompts(problem + "\\n\\n" + instruction, system=system, chat=chat) (chat False:
    plain text, for a tokenizer without a chat template), left-padded to the
    longest prompt; batches of batch_size prompts (the last one filled up with repeats, so every
    batch has one shape and compiles once) use key fold_in(PRNGKey(seed), batch index).
    Temperature 0 is greedy, so one completion is generated and repeated k times.
    """
    import jax

    from topd_jax.models.tokenizer import encode_prompts
    from topd_jax.prompts import left_pad
    from topd_jax.sampling import SamplingOptions, generate

    texts = [f"{p}\n\n{instruction}" if instruction else p for p in problems]
    rows = encode_prompts(tokenizer, texts, system=system, chat=chat)
    width = max(len(r) for r in rows)
    drawn = 1 if temperature == 0 else samples
    key = jax.random.PRNGKey(seed)
    options = SamplingOptions(temperature=temperature, top_p=top_p, eos_ids=tuple(eos_ids))
    completions: list[list[str]] = []
    finished: list[list[bool]] = []
    for b, start in enumerate(range(0, len(rows), batch_size)):
        batch = rows[start:start + batch_size]
        real = len(batch)
        tokens, mask = left_pad(batch + [batch[-1]] * (batch_size - real), width)
        out = generate(model, tokens, mask, key=jax.random.fold_in(key, b), max_new_tokens=max_new_tokens,
                       num_samples=drawn, options=options)
        ids, keep, done = (np.asarray(jax.device_get(x)) for x in (out.tokens, out.mask, out.finished))
        for i in range(real):
            rows_i = range(i * drawn, (i + 1) * drawn)
            decoded = [tokenizer.decode(ids[r][keep[r]].tolist(), skip_special_tokens=True) for r in rows_i]
            completions.append((decoded * samples)[:samples] if drawn == 1 else decoded)
            finished.append([bool(done[r]) for r in rows_i] * (samples // drawn))
    return completions, finished


def grade(records: Sequence[math_sets.MathRecord], completions: Sequence[Sequence[str]],
          finished: Sequence[Sequence[bool]] | None = None) -> dict[str, Any]:
    """Grade completions [P][k] against the records' answers; the metrics of `evaluate`."""
    if len(completions) != len(records) or not records:
        raise ValueError(f"need one row of completions per record (>= 1), got {len(completions)} rows "
                         f"for {len(records)} records")
    k = len(completions[0])
    if k < 1 or any(len(row) != k for row in completions):
        raise ValueError("every record needs the same number (>= 1) of completions")
    extracted = [[grading.last_boxed(t) for t in row] for row in completions]
    correct = np.array([[e is not None and grading.answers_match(e, r.answer) for e in ex]
                        for ex, r in zip(extracted, records)], bool)
    done = np.ones_like(correct) if finished is None else np.asarray(finished, bool)
    problems = [{"id": r.id, "answer": r.answer, "extracted": ex, "correct": c.tolist(), "finished": f.tolist(),
                 "completions": list(row)}
                for r, ex, c, f, row in zip(records, extracted, correct, done, completions)]
    return {"n": len(records), "k": k, "accuracy": float(correct[:, 0].mean()), "avg@k": grading.avg_at_k(correct),
            "pass@k": grading.pass_at_k(correct), "num_correct": int(correct[:, 0].sum()),
            "boxed": float(np.mean([[e is not None for e in ex] for ex in extracted])),
            "finished": float(done.mean()), "problems": problems}


def evaluate(model, tokenizer, records: Sequence[math_sets.MathRecord], *, samples: int = 1,
             temperature: float = 0.0, max_new_tokens: int = 1024, batch_size: int = 8, seed: int = 0,
             top_p: float = 1.0, system: str | None = None, instruction: str = INSTRUCTION,
             eos_ids: Sequence[int] | None = None, chat: bool = True) -> dict[str, Any]:
    """Sample `samples` completions per record and grade them (module docstring).

    Returns n, k, accuracy (first sample), avg@k, pass@k (topd_jax.grading), num_correct (first
    samples), boxed (fraction of samples with a \\boxed answer), finished (fraction that ended with
    an EOS) and problems (per record: id, answer, extracted, correct, finished, completions).
    eos_ids None = the tokenizer's EOS token.
    """
    if samples < 1 or batch_size < 1 or max_new_tokens < 1:
        raise ValueError(f"samples, batch_size and max_new_tokens must be >= 1, got {samples}, {batch_size}, "
                         f"{max_new_tokens}")
    if not records:
        raise ValueError("no records to evaluate")
    if eos_ids is None:
        eos_ids = () if tokenizer.eos_token_id is None else (int(tokenizer.eos_token_id),)
    completions, finished = generate_completions(
        model, tokenizer, [r.problem for r in records], samples=samples, temperature=temperature, top_p=top_p,
        max_new_tokens=max_new_tokens, batch_size=batch_size, seed=seed, system=system, instruction=instruction,
        eos_ids=eos_ids, chat=chat)
    return grade(records, completions, finished)


def markdown_table(results: dict[str, dict[str, Any]]) -> str:
    """dataset | n | accuracy | avg@k | pass@k, in percent, one row per dataset."""
    lines = ["| dataset | n | accuracy (%) | avg@k (%) | pass@k (%) | k |", "|---|---|---|---|---|---|"]
    for name, m in results.items():
        lines.append(f"| {name} | {m['n']} | {100 * m['accuracy']:.1f} | {100 * m['avg@k']:.1f} | "
                     f"{100 * m['pass@k']:.1f} | {m['k']} |")
    return "\n".join(lines) + "\n"


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    from topd_jax.models.config import DTYPES

    parser = ArgumentParser(prog="python -m topd_jax.eval", description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True, help="Hugging Face directory or training run output_dir")
    parser.add_argument("--config", help="training YAML config (default: the run's config.yaml, else defaults)")
    parser.add_argument("--datasets", default=DEFAULT_DATASETS, help=f"comma list of {', '.join(math_sets.LAYOUTS)}")
    parser.add_argument("--data-dir", help="directory of the dataset files (default: math_sets.default_path)")
    parser.add_argument("--tokenizer", help="tokenizer directory (default: the checkpoint's, else student.path)")
    parser.add_argument("--samples", type=int, default=1, help="completions per problem k (default 1)")
    parser.add_argument("--temperature", type=float, default=0.0, help="finite, >= 0; 0 = greedy (default)")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus mass in (0, 1] (default 1: off)")
    parser.add_argument("--max-new-tokens", type=int, help="default: rollout.max_new_tokens of the config")
    parser.add_argument("--batch-size", type=int, default=8, help="problems per generate call")
    parser.add_argument("--limit", type=int, help="evaluate only the first n problems of each dataset")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", choices=tuple(DTYPES), help="default: student.dtype of the config")
    parser.add_argument("--out", help="results directory, created with its parents if new (default: "
                        "eval/<checkpoint name>)")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error (or TOPD_DEBUG=1)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="dotted training-config overrides")
    return parser.parse_args(argv)


def _dataset_files(names: str, data_dir: str | None) -> dict[str, str]:
    files = {}
    for name in [n.strip() for n in names.split(",") if n.strip()]:
        if name not in math_sets.LAYOUTS:
            raise ConfigError(f"unknown dataset {name!r}; known: {', '.join(math_sets.LAYOUTS)}")
        path = math_sets.default_path(name, data_dir)
        if path is None:
            where = data_dir or ", ".join(map(str, math_sets.data_dirs()))
            raise FileNotFoundError(f"no {math_sets.LAYOUTS[name].file} for dataset {name!r} in {where} "
                                    f"(pass --data-dir or set ${math_sets.ENV_DATA_DIR})")
        files[name] = path
    if not files:
        raise ConfigError("--datasets names no dataset")
    return files


def _load(args: argparse.Namespace, config, workdir: str):
    """(load the model, its ModelConfig, tokenizer) of --checkpoint: an HF directory, or a run
    directory exported into workdir. The tokenizer is checked against the checkpoint's vocab_size
    from config.json, before any weight is read."""
    from topd_jax.models.checkpoint import load_pretrained
    from topd_jax.models.config import DTYPES
    from topd_jax.models.families import read_config
    from topd_jax.models.tokenizer import has_tokenizer, load_tokenizer

    path = args.checkpoint
    is_run = not os.path.isfile(os.path.join(path, "config.json"))
    if is_run and not os.path.isdir(os.path.join(path, "checkpoints")):
        raise FileNotFoundError(f"{path} is neither a Hugging Face directory (config.json) nor a training "
                                f"run (checkpoints/)")
    if is_run:  # export writes the run's tokenizer beside the weights when the run has one
        from topd_jax.export import export_step

        exported = export_step(path, workdir, report=lambda message: print(f"warning: {message}", file=sys.stderr))
        print(f"evaluating {exported.describe(path)}", file=sys.stderr)
    where = workdir if is_run else path
    tokenizer_dir = args.tokenizer or (where if has_tokenizer(where) else config.student.path)
    if tokenizer_dir is None:
        raise FileNotFoundError(f"no tokenizer for {path}: it has no tokenizer files (a run of random models on "
                                "random prompts has none); pass --tokenizer DIR or student.path=DIR")
    path = where
    dtype = DTYPES[args.dtype or config.student.dtype]
    try:
        tokenizer = load_tokenizer(tokenizer_dir)
    except (OSError, ValueError) as err:  # transformers: "Couldn't instantiate the backend tokenizer ..."
        raise ConfigError(f"tokenizer {tokenizer_dir}: not a loadable tokenizer directory "
                          f"({str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__})") from err
    model_config = read_config(path)
    top = max(tokenizer.get_vocab().values(), default=-1) + 1
    if top > model_config.vocab_size:  # before any weight is read
        raise ConfigError(f"tokenizer {tokenizer_dir} has token ids up to {top - 1}, but the checkpoint {path} has "
                          f"vocab_size {model_config.vocab_size}: not this model's tokenizer")
    return (lambda: load_pretrained(path, dtype=dtype)), model_config, tokenizer


def _check_positions(model_config, tokenizer, sets: dict[str, tuple[list, dict, str]],
                     settings: dict[str, Any]) -> None:
    """Every dataset's longest prompt + max_new_tokens within the model's max_position_embeddings,
    checked before anything is generated."""
    from topd_jax.models.tokenizer import encode_prompts

    limit, new = model_config.max_position_embeddings, settings["max_new_tokens"]
    for name, (records, _, _) in sets.items():
        texts = [f"{r.problem}\n\n{settings['instruction']}" if settings["instruction"] else r.problem for r in records]
        longest = max(len(ids) for ids in encode_prompts(tokenizer, texts, system=settings["system"],
                                                         chat=settings.get("chat", True)))
        if longest + new > limit:
            raise ConfigError(f"{name}: its longest prompt ({longest} tokens) + --max-new-tokens {new} = "
                              f"{longest + new} positions, but the model's max_position_embeddings is {limit}; "
                              "lower --max-new-tokens")


def check_options(args: argparse.Namespace) -> None:
    """The value range of every numeric option, one line each, before anything is read."""
    import math

    for flag in ("limit", "samples", "batch_size", "max_new_tokens"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise ConfigError(f"--{flag.replace('_', '-')} must be >= 1, got {value}")
    if not (math.isfinite(args.temperature) and args.temperature >= 0):
        raise ConfigError(f"--temperature must be a finite number >= 0 (0 = greedy), got {args.temperature}")
    if not 0 < args.top_p <= 1:
        raise ConfigError(f"--top-p must be in (0, 1], got {args.top_p}")
    if not 0 <= args.seed < 2**32:
        raise ConfigError(f"--seed must be in [0, 2**32), got {args.seed}")


def _read_all(files: dict[str, str], limit: int | None) -> dict[str, tuple[list, dict, str]]:
    """{name: (records, skipped counts, path)}: every requested dataset read and checked before
    anything is generated, so a bad later file fails in a second, not after the earlier ones ran."""
    sets = {}
    for name, path in files.items():
        records, skipped = math_sets.read_records(path, name)
        records = records[:limit]
        if not records:
            raise ConfigError(f"{path} has no usable {name} records (skipped: {dict(skipped)})")
        sets[name] = (records, dict(skipped), path)
    return sets


def _write_results(out: str, summary: dict[str, Any]) -> None:
    """results.json and results.md as they stand (atomically: a reader never sees half a file)."""
    write_file(os.path.join(out, "results.json"), json.dumps(summary, indent=2) + "\n")
    write_file(os.path.join(out, "results.md"), markdown_table(summary["datasets"]))


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Evaluate every dataset of `args` and write OUT/results.json, results.md and the samples files.

    All datasets are read and checked first; results.json is rewritten after each dataset with
    `complete: false` until the last one is done, so an interrupted evaluation keeps what finished.
    """
    from topd_jax.trainer.config import load_config

    from topd_jax.configuration import check_command_line

    check_options(args)
    run_config = os.path.join(args.checkpoint, "config.yaml")
    config_file = args.config or (run_config if os.path.isfile(run_config) else None)
    check_command_line(config_file, args.overrides)
    config = load_config(config_file, args.overrides)
    sets = _read_all(_dataset_files(args.datasets, args.data_dir), args.limit)
    warnings = []  # said once every check has passed: a refused evaluation is its one error line
    for name, (records, skipped, path) in sets.items():  # n counts only the usable records: say what was not
        if skipped:
            count = sum(skipped.values())
            warnings.append(f"{name}: {len(records)} problems; skipped {count} record{'s' * (count != 1)} of "
                            f"{path} (" + ", ".join(f"{reason}: {n}" for reason, n in sorted(skipped.items())) + ")")
    out = args.out or os.path.join("eval", os.path.basename(os.path.normpath(args.checkpoint)))
    check_writable(out, directory=True)  # before a model is loaded or anything generated
    settings = dict(samples=args.samples, temperature=args.temperature, top_p=args.top_p, seed=args.seed,
                    max_new_tokens=args.max_new_tokens or config.rollout.max_new_tokens, batch_size=args.batch_size,
                    system=config.data.system_prompt, instruction=INSTRUCTION)
    with tempfile.TemporaryDirectory(prefix="topd_eval_") as workdir:
        load_model, model_config, tokenizer = _load(args, config, os.path.join(workdir, "hf"))
        from topd_jax.models.tokenizer import has_chat_template

        settings["chat"] = has_chat_template(tokenizer)
        if not settings["chat"]:  # base models often have none; the prompts are then plain text
            warnings.append(f"tokenizer {getattr(tokenizer, 'name_or_path', '') or args.tokenizer} has no chat "
                            "template: each prompt is the plain text (system prompt, problem and instruction, a "
                            "blank line apart), without chat markup")
        _check_positions(model_config, tokenizer, sets, settings)
        model = load_model()
        for warning in warnings:
            print(f"warning: {warning}", file=sys.stderr)
        eos = sorted({*config.rollout.eos_ids, *([tokenizer.eos_token_id] if tokenizer.eos_token_id is not None
                                                 else [])})
        os.makedirs(out, exist_ok=True)
        summary: dict[str, Any] = {"checkpoint": args.checkpoint,
                                   "settings": {**settings, "eos_ids": eos, "limit": args.limit},
                                   "datasets": {}, "complete": False}
        for name, (records, skipped, path) in sets.items():
            metrics = evaluate(model, tokenizer, records, eos_ids=eos, **settings)
            samples = "".join(json.dumps(p, ensure_ascii=False) + "\n" for p in metrics.pop("problems"))
            write_file(os.path.join(out, f"{name}.samples.jsonl"), samples)
            summary["datasets"][name] = {**metrics, "skipped": skipped, "file": path}
            summary["complete"] = len(summary["datasets"]) == len(sets)
            _write_results(out, summary)
    return summary


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)

    def body() -> int:
        summary = run(args)
        print(markdown_table(summary["datasets"]), end="")
        return 0

    return run_cli(body, debug=args.debug)


if __name__ == "__main__":
    exit_quietly(main())
